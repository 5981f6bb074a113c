//! Scale from zero on an event: the time from the first event published for an `http`
//! function at zero replicas to that function's first invocation, on the bundled gateway
//! with a supervised redis-connector, against the function's own start time measured in
//! the same run (a load program, `harness = false`; not a timed test).
//!
//! ```text
//! cargo bench -p gateway --bench cold_start            # 20 runs
//! cargo bench -p gateway --bench cold_start -- 50      # runs
//! REDIS_URL=redis://127.0.0.1:6379 cargo bench -p gateway --bench cold_start
//! ```
//!
//! What it starts, all on loopback: the release `gateway` binary (local provider) with one
//! `http` function, `cold`, scaled to zero (`com.openfaas.scale.min = 0`, zero after 1 s
//! idle), subscribed to a fresh Redis stream, and the release `redis-connector` under the
//! gateway's supervisor (built here with `cargo build --release` when it is missing or
//! older than its sources would make it: cargo decides). The function is a Python
//! `http.server` program, the usual shape of a small function, that writes the wall-clock
//! time (`time.time_ns()`) at which a `POST` reaches its handler to a file named after the
//! body. Redis must be running (`REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Each run:
//! 1. **start**: this program spawns the function itself (`python3 cold.py`, a free
//!    `PORT`) and measures from the spawn until `GET /` first answers 200 (polled every
//!    millisecond): the function's own start time, the floor of any scale from zero;
//! 2. **cold**: once the gateway reports `cold` at zero replicas, it takes the wall-clock
//!    time and publishes one entry (`XADD`) to the stream; the time until the function's
//!    handler saw it (the time the function wrote) is the first event's latency. It
//!    includes the connector's read, the gateway starting a replica, its health checks
//!    (every 50 ms until ready), and the invocation;
//! 3. **warm**: a second entry right after, to the function now running: the path's
//!    latency without a start;
//! 4. it waits until the gateway scales the function back to zero.
//!
//! It prints each run and the median and p99 of start, cold, warm and cold − start (per
//! run). Target (issue 19): cold − start at most 1 s.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program, not library code

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{free_addr, quantile, start_gateway, stop_gateway};
use tokio::process::Command;

/// The function: answers `GET` 200, and on `POST` writes the time its handler started to
/// `invoked/<body>` (aside, then renamed, so a reader never sees half a file).
const FUNCTION: &str = r#"
import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(b"OK")

    def do_POST(self):
        at = time.time_ns()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        name = os.path.join("invoked", body.decode())
        with open(name + ".tmp", "w") as f:
            f.write(str(at))
        os.rename(name + ".tmp", name)
        self.answer(b"done")

    def answer(self, data):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const WITHIN: Duration = Duration::from_secs(30);

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bench(runs.max(1)));
}

async fn bench(runs: usize) {
    let connector = build_connector();
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis at {redis_url}: {e}"));
    let stream = format!("cold-start-{}", std::process::id());

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    std::fs::write(dir.join("cold.py"), FUNCTION).unwrap();
    std::fs::create_dir(dir.join("invoked")).unwrap();
    std::fs::write(
        dir.join("redis.toml"),
        format!(
            r#"[connector]
metrics_addr = "127.0.0.1:0"
rebuild_interval = "1s"

[redis]
url = "{redis_url}"
group = "cold-start"
start_id = "$"
body_field = "payload"
metrics_interval = "200ms"
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            r#"[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"

[[functions]]
name = "cold"
runtime = "http"
command = "python3 cold.py"
labels = {{ "com.openfaas.scale.min" = "0", "com.openfaas.scale.zero-duration" = "1s" }}
annotations = {{ topic = "{stream}" }}

[[connectors]]
name = "redis"
command = "{connector}"
config = "redis.toml"
"#,
            connector = connector.display()
        ),
    )
    .unwrap();

    let support::Gateway {
        child: mut gateway,
        addr,
        ..
    } = start_gateway(&dir.join("gateway.toml")).await;
    let client = reqwest::Client::new();
    let replicas = |client: &reqwest::Client| {
        let request = client
            .get(format!("http://{addr}/system/function/cold"))
            .send();
        async move {
            let status: serde_json::Value = request.await.ok()?.json().await.ok()?;
            status["replicas"].as_u64()
        }
    };
    let connector_ready = wait_until(WITHIN, || async {
        // The connector is ready once the gateway's log says so and its group exists.
        let groups: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut redis.clone())
            .await;
        matches!(groups, Ok(redis::Value::Array(g)) if !g.is_empty())
    })
    .await;
    assert!(
        connector_ready,
        "the redis-connector did not join the stream"
    );

    println!("{runs} runs: function start, first event at zero replicas, warm event (ms)");
    let mut start = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut extra = Vec::new();
    for run in 0..runs {
        let own = function_start(dir).await;
        let at_zero = wait_until(WITHIN, || async { replicas(&client).await == Some(0) }).await;
        assert!(at_zero, "run {run}: the function did not scale to zero");

        let first = publish_and_wait(&mut redis, &stream, dir, &format!("{run}-cold")).await;
        let second = publish_and_wait(&mut redis, &stream, dir, &format!("{run}-warm")).await;
        println!(
            "run {run:>3}: start {:>7.1}  cold {:>7.1}  warm {:>6.2}  cold-start {:>7.1}",
            ms(own),
            ms(first),
            ms(second),
            ms(first) - ms(own)
        );
        start.push(ms(own));
        cold.push(ms(first));
        warm.push(ms(second));
        extra.push(ms(first) - ms(own));
    }

    println!();
    println!("{:<28} {:>9} {:>9}", "(ms)", "median", "p99");
    for (name, values) in [
        ("function start", &mut start),
        ("first event at zero", &mut cold),
        ("event, function running", &mut warm),
        ("first event - start", &mut extra),
    ] {
        values.sort_by(f64::total_cmp);
        println!(
            "{name:<28} {:>9.1} {:>9.1}",
            quantile(values, 0.5),
            quantile(values, 0.99)
        );
    }
    println!(
        "target: first event - start at most 1000 ms (p99 here {:.1} ms)",
        quantile(&extra, 0.99)
    );

    stop_gateway(&mut gateway).await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&stream).query_async(&mut redis).await;
}

/// Publishes `body` to `stream` and waits until the function wrote when it got it: the
/// time from just before the `XADD` to then.
async fn publish_and_wait(
    redis: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    dir: &Path,
    body: &str,
) -> Duration {
    let file = dir.join("invoked").join(body);
    let sent = SystemTime::now();
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("payload")
        .arg(body)
        .query_async(redis)
        .await
        .unwrap();
    let got = wait_until(WITHIN, || async { file.exists() }).await;
    assert!(got, "the function did not get {body} within {WITHIN:?}");
    let at: u64 = std::fs::read_to_string(&file).unwrap().parse().unwrap();
    let at = UNIX_EPOCH + Duration::from_nanos(at);
    at.duration_since(sent).unwrap_or_default()
}

/// Spawns the function as the gateway would (its directory, a `PORT`) and measures until
/// `GET /` answers 200.
async fn function_start(dir: &Path) -> Duration {
    let port = free_addr().port();
    let spawned = Instant::now();
    let mut child = Command::new("python3")
        .arg("cold.py")
        .current_dir(dir)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            spawned.elapsed() < WITHIN,
            "the function did not start within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = spawned.elapsed();
    let _ = child.kill().await;
    took
}

/// `cargo build --release -p redis-connector`, and its path beside this gateway's.
fn build_connector() -> PathBuf {
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    let path = gateway.with_file_name("redis-connector");
    let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cargo
        .args(["build", "--release", "--quiet", "-p", "redis-connector"])
        .args(["--bin", "redis-connector"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Without the variables `cargo bench` sets for this crate, which build scripts read
    // (see integration_tests::binary).
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(|v| v.starts_with("CARGO_")) && var != "CARGO_TARGET_DIR" {
            cargo.env_remove(var);
        }
    }
    let status = cargo.status().expect("cargo");
    assert!(status.success(), "cargo build -p redis-connector failed");
    assert!(path.exists(), "no {}", path.display());
    path
}

/// Polls `condition` every 2 ms until it holds or `within` passes.
async fn wait_until<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
