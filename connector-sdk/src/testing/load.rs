//! Pieces of the connectors' load programs (`benches/throughput.rs`, `harness = false`):
//! the no-op function they invoke, the plain HTTP ceiling they are compared to, and what
//! they read about the connector process.
//!
//! The function runs in a child process, so its CPU is not the load program's: the load
//! program calls [`serve_if_asked`] first thing in `main`, and [`NoopFunction::spawn`]
//! starts the same executable again with [`SERVE_ARG`]. The function answers
//! `POST /function/{name}` with 200 and an empty body, lists one function `noop`
//! subscribed to the given topic on `GET /system/functions`, and counts the calls it
//! answered on `GET /count`.
//!
//! Latency runs ([`paced`]) send bodies made by [`stamped_body`], which carry their send
//! time; the function keeps each such body's send-to-arrival time, which
//! [`NoopFunction::take_latencies`] reads (the two processes share the machine's clock).
//! A plain client of the broker calls the function as [`PlainInvoker`], in the same run,
//! and [`latency_table`] prints both paths and the difference.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::{get, post};

use crate::gateway::GatewayClient;
use crate::{Message, SdkConfig};

/// The first argument that makes a load program serve the no-op function.
pub const SERVE_ARG: &str = "serve-noop-function";

/// The whole `main` of a load program: serves the no-op function when this process was
/// started as one ([`serve_if_asked`]), else runs `bench` on a two-thread runtime.
pub fn main<F: std::future::Future<Output = ()>>(bench: impl FnOnce() -> F) {
    if serve_if_asked() {
        return;
    }
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(bench()),
        Err(e) => eprintln!("cannot start the runtime: {e}"),
    }
}

/// The environment variable `name` parsed, else `default` (a load program's settings).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// When this process was started by [`NoopFunction::spawn`] (arguments `SERVE_ARG ADDR
/// TOPIC`), serves the no-op function until killed and returns `true`; otherwise returns
/// `false` at once.
pub fn serve_if_asked() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(SERVE_ARG) {
        return false;
    }
    let (Some(addr), Some(topic)) = (
        args.get(2).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(3),
    ) else {
        eprintln!("usage: {SERVE_ARG} ADDR TOPIC");
        return true;
    };
    if let Err(e) = serve(addr, topic) {
        eprintln!("no-op function on {addr}: {e}");
    }
    true
}

fn serve(addr: SocketAddr, topic: &str) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("noop-function")
        .enable_all()
        .build()?;
    let functions = serde_json::json!([
        {"name": "noop", "annotations": {"topic": topic}, "replicas": 1}
    ])
    .to_string();
    runtime.block_on(async move {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
        let kept = latencies.clone();
        let app = Router::new()
            .route(
                "/function/{name}",
                post(move |body: bytes::Bytes| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Some(took) = since_stamp(&body) {
                        latencies
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(took);
                    }
                    async { "" }
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
                "/latencies",
                get(move || {
                    let taken =
                        std::mem::take(&mut *kept.lock().unwrap_or_else(PoisonError::into_inner));
                    async move { axum::Json(taken) }
                }),
            )
            .route(
                "/system/functions",
                get(move || {
                    let f = functions.clone();
                    async move { ([("content-type", "application/json")], f) }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    })
}

/// The no-op function in its child process; killed on drop.
#[derive(Debug)]
pub struct NoopFunction {
    /// Where it listens: the gateway URL is `http://{addr}`.
    pub addr: SocketAddr,
    child: Child,
    http: reqwest::Client,
}

impl NoopFunction {
    /// Starts this executable again as the no-op function subscribed to `topic`, and waits
    /// until it accepts connections.
    pub fn spawn(topic: &str) -> std::io::Result<Self> {
        let addr = free_addr()?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg(SERVE_ARG)
            .arg(addr.to_string())
            .arg(topic)
            .stdout(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Err(std::io::Error::other("the no-op function did not start"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            addr,
            child,
            http: reqwest::Client::new(),
        })
    }

    /// The gateway URL to configure the connector with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls answered so far.
    pub async fn calls(&self) -> Result<u64, LoadError> {
        let text = self
            .http
            .get(format!("http://{}/count", self.addr))
            .send()
            .await?
            .text()
            .await?;
        text.trim()
            .parse()
            .map_err(|_| LoadError::Unexpected(format!("/count answered {text:?}")))
    }
}

impl NoopFunction {
    /// The send-to-arrival times, in microseconds, of the stamped bodies the function got
    /// since the last call, in arrival order.
    pub async fn take_latencies(&self) -> Result<Vec<u64>, LoadError> {
        Ok(self
            .http
            .get(format!("http://{}/latencies", self.addr))
            .send()
            .await?
            .json()
            .await?)
    }
}

const STAMP: &str = "{\"sent_ns\":";

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A body that carries the time it is made: `{"sent_ns":<unix nanoseconds>}`.
pub fn stamped_body() -> String {
    format!("{STAMP}{}}}", unix_nanos())
}

/// Microseconds since a [`stamped_body`]'s stamp; `None` for any other body.
fn since_stamp(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(STAMP.as_bytes())?;
    let digits = rest.strip_suffix(b"}")?;
    let sent: u128 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(u64::try_from(unix_nanos().saturating_sub(sent) / 1000).unwrap_or(u64::MAX))
}

/// Calls `publish` with a fresh [`stamped_body`] `rate` times a second for `seconds`, each
/// call in a task of its own (a publish that takes longer than the interval does not slow
/// the schedule); returns once every publish has returned, with how many failed.
pub async fn paced<F, Fut>(rate: u64, seconds: u64, publish: F) -> u64
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..rate * seconds {
        tick.tick().await;
        sends.spawn(publish(stamped_body()));
    }
    let mut failed = 0;
    while let Some(sent) = sends.join_next().await {
        if !matches!(sent, Ok(true)) {
            failed += 1;
        }
    }
    failed
}

/// One path's latencies: a warm-up second at `rate` (its samples dropped), then `rate`
/// bodies a second for `seconds` through `publish`; waits (30 s at most) until the
/// function got every one, and returns what it saw of the measured ones.
pub async fn latencies<F, Fut>(
    function: &NoopFunction,
    rate: u64,
    seconds: u64,
    publish: F,
) -> Result<Vec<u64>, LoadError>
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut got = Vec::new();
    for (seconds, keep) in [(1, false), (seconds, true)] {
        let failed = paced(rate, seconds, publish.clone()).await;
        if failed > 0 {
            return Err(LoadError::Unexpected(format!("{failed} publishes failed")));
        }
        let want = (rate * seconds) as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        got.clear();
        while got.len() < want {
            if Instant::now() >= deadline {
                return Err(LoadError::Unexpected(format!(
                    "{} of {want} messages reached the function",
                    got.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            got.extend(function.take_latencies().await?);
        }
        if keep {
            return Ok(got);
        }
    }
    Ok(got)
}

/// A plain broker client's way to call the function: `POST {gateway}/function/noop` with
/// the message's body, on a keep-alive pool.
#[derive(Debug, Clone)]
pub struct PlainInvoker {
    http: reqwest::Client,
    url: Arc<str>,
}

impl PlainInvoker {
    /// Calls the no-op function at `gateway_url` (`http://host:port`).
    pub fn new(gateway_url: &str) -> Result<Self, LoadError> {
        Ok(Self {
            http: reqwest::Client::builder().tcp_nodelay(true).build()?,
            url: format!("{gateway_url}/function/noop").into(),
        })
    }

    /// One call; an error unless it answers 2xx.
    pub async fn invoke(&self, body: impl Into<reqwest::Body>) -> Result<(), LoadError> {
        let response = self.http.post(&*self.url).body(body).send().await?;
        if !response.status().is_success() {
            return Err(LoadError::Unexpected(format!(
                "the no-op function answered {}",
                response.status()
            )));
        }
        response.bytes().await?;
        Ok(())
    }
}

/// `p` (0 to 1) of `sorted`, nearest rank; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The markdown table of a latency run: each path's samples, p50 and p99 in
/// milliseconds, and what the connector adds (its percentile less the plain client's).
pub fn latency_table(
    rate: u64,
    seconds: u64,
    plain_name: &str,
    plain: Vec<u64>,
    connector: Vec<u64>,
) -> String {
    latency_comparison(
        rate,
        seconds,
        (&format!("publish → {plain_name} → function"), plain),
        ("publish → connector → function", connector),
        "added by the connector",
    )
}

/// The same for any two runs: `second`'s percentiles less `first`'s, in a row named
/// `difference` (a run against itself shows the bench's own noise).
pub fn latency_comparison(
    rate: u64,
    seconds: u64,
    (first_name, mut first): (&str, Vec<u64>),
    (second_name, mut second): (&str, Vec<u64>),
    difference: &str,
) -> String {
    first.sort_unstable();
    second.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let (p50, p99) = (percentile(&first, 0.5), percentile(&first, 0.99));
    let (c50, c99) = (percentile(&second, 0.5), percentile(&second, 0.99));
    format!(
        "| {rate} msg/s for {seconds} s | samples | p50 ms | p99 ms |\n\
         | --- | --- | --- | --- |\n\
         | {first_name} | {} | {:.3} | {:.3} |\n\
         | {second_name} | {} | {:.3} | {:.3} |\n\
         | {difference} | | {:+.3} | {:+.3} |\n",
        first.len(),
        ms(p50),
        ms(p99),
        second.len(),
        ms(c50),
        ms(c99),
        (c50 as f64 - p50 as f64) / 1000.0,
        (c99 as f64 - p99 as f64) / 1000.0,
    )
}

impl Drop for NoopFunction {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What went wrong in a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An HTTP request failed.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The gateway client could not be built.
    #[error(transparent)]
    Sdk(#[from] crate::SdkError),
    /// An answer that should not happen.
    #[error("{0}")]
    Unexpected(String),
}

/// The plain HTTP ceiling: `count` requests to `{gateway_url}/function/noop`, made as the
/// connector named `connector` makes them (its route, the headers of
/// [`GatewayClient::invocation_headers`] for `message(i)`, the same body), with
/// `concurrency` in flight on a keep-alive pool. Returns requests per second.
pub async fn ceiling(
    gateway_url: &str,
    connector: &str,
    concurrency: usize,
    count: u64,
    message: impl Fn(u64) -> Message + Send + Sync + 'static,
) -> Result<f64, LoadError> {
    let config = SdkConfig {
        gateway_url: gateway_url.to_owned(),
        ..SdkConfig::default()
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .tcp_nodelay(true)
        .build()?;
    let gateway = GatewayClient::new(connector, &config)?;
    let url = format!("{}/function/noop", config.gateway_url);
    let next = Arc::new(AtomicU64::new(0));
    let message = Arc::new(message);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, next, gateway, message) = (
                client.clone(),
                url.clone(),
                next.clone(),
                gateway.clone(),
                message.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok(());
                    }
                    let message = message(i);
                    let headers = gateway.invocation_headers(&message, 1);
                    let resp = client
                        .post(&url)
                        .headers(headers)
                        .body(message.payload.clone())
                        .send()
                        .await?;
                    if !resp.status().is_success() {
                        return Err(LoadError::Unexpected(format!(
                            "the no-op function answered {}",
                            resp.status()
                        )));
                    }
                    resp.bytes().await?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await
            .map_err(|e| LoadError::Unexpected(format!("ceiling worker: {e}")))??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Waits until `GET http://{addr}/readyz` answers 200, for at most `within`.
pub async fn wait_ready(addr: SocketAddr, within: Duration) -> bool {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let ready = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A connector binary a load program runs: its config in a file of its own, `RUST_LOG`
/// at `warn`, stdout discarded; stopped with SIGTERM by [`stop`](Self::stop).
#[derive(Debug)]
pub struct ConnectorProcess {
    child: Child,
    /// Its process id, for [`status_kib`] and [`cpu_time`].
    pub pid: u32,
    dir: std::path::PathBuf,
}

impl ConnectorProcess {
    /// Starts `binary --config <config_toml>` and waits (30 s at most) until `/readyz` on
    /// `metrics` answers 200.
    pub async fn start(
        binary: &str,
        config_toml: &str,
        metrics: SocketAddr,
    ) -> Result<Self, LoadError> {
        let io = |e: std::io::Error| LoadError::Unexpected(format!("starting {binary}: {e}"));
        let dir = std::env::temp_dir().join(format!("load-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml).map_err(io)?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(io)?;
        let process = Self {
            pid: child.id(),
            child,
            dir,
        };
        if !wait_ready(metrics, Duration::from_secs(30)).await {
            return Err(LoadError::Unexpected(format!("{binary} not ready")));
        }
        Ok(process)
    }

    /// SIGTERM, then waits for the exit: an error unless it exits 0.
    pub fn stop(mut self) -> Result<(), LoadError> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let status = self
            .child
            .wait()
            .map_err(|e| LoadError::Unexpected(e.to_string()))?;
        let _ = std::fs::remove_dir_all(&self.dir);
        if status.success() {
            Ok(())
        } else {
            Err(LoadError::Unexpected(format!("exit status {status:?}")))
        }
    }
}

/// A free loopback port.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB; 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid` from `/proc/<pid>/stat` (clock ticks of 10 ms:
/// USER_HZ is 100 on Linux); zero when unreadable.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .unwrap_or("");
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((field(11) + field(12)) * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_read_back_and_other_bodies_are_not() {
        let body = stamped_body();
        let took = since_stamp(body.as_bytes()).expect("a stamped body");
        assert!(took < 60_000_000, "{took} µs");
        assert_eq!(since_stamp(br#"{"order":42}"#), None);
        assert_eq!(since_stamp(br#"{"sent_ns":12x}"#), None);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let pid = std::process::id();
        assert!(status_kib(pid, "VmRSS") > 0);
        assert!(status_kib(pid, "VmHWM") >= status_kib(pid, "VmRSS"));
        let mut x = 0u64;
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_time(pid) > Duration::ZERO);
        assert_eq!(status_kib(u32::MAX, "VmRSS"), 0);
    }
}
