//! The gateway as a reverse proxy, against nginx in front of the same no-op backend, in
//! the same run (a load program, `harness = false`; not a timed test).
//!
//! ```text
//! cargo bench -p gateway --bench proxy                 # 5 rounds of 2 s per side and case
//! cargo bench -p gateway --bench proxy -- 7 3          # rounds, seconds per run
//! BENCH_CASES=url,external cargo bench -p gateway --bench proxy
//! ```
//!
//! What it starts, all on loopback:
//! - the **no-op backend**: this same program run as `proxy --noop-backend` (axum, answers
//!   every request 200 `ok` after reading its body), once on its own (the `url` function
//!   and the external provider point at it) and once as the `http` function's replica,
//!   which the local gateway starts with its port in `PORT`;
//! - **nginx** (installed with `apt-get install -y nginx` when missing), from a generated
//!   config: one worker, `access_log off`, upstreams with `keepalive`, HTTP/1.1 upstream,
//!   `X-Forwarded-For`/`X-Forwarded-Host` set; one server in front of each backend;
//! - two gateways (the release build of the `gateway` binary): one with the local provider
//!   (`url` function `raw`, `http` function `echo`, `process` function `cat`), one in
//!   external-provider mode whose provider is the no-op backend.
//!
//! For each case (`http`, `url`, `external`) and each connection count (1, 64) it runs
//! `rounds` rounds; a round loads nginx and then the gateway (the order swaps every round)
//! for the same time with `POST` requests of 5 bytes over N keep-alive connections of its
//! own hyper client, one connection per loop. It prints each side's median requests/s and
//! the median of the per-round ratios gateway / nginx, and each proxy's CPU time per
//! request (`/proc/<pid>/stat`, nginx's master and workers). The `process` case compares
//! `/function/cat` against this program spawning `cat` itself. It also prints the local
//! gateway's resident memory idle (after the functions are ready) and its peak.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program, not library code

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{free_addr, median, start_gateway, stop_gateway};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const CONNECTIONS: [usize; 2] = [1, 64];
const BODY: &[u8] = b"hello";

fn main() {
    if std::env::args().any(|a| a == "--noop-backend") {
        noop_backend();
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

/// The no-op backend: answers anything 200 `ok`. Listens on `PORT` (0 when unset) and says
/// where on stdout, so the bench and the gateway's log both see it.
fn noop_backend() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            println!("listening on {}", listener.local_addr().unwrap());
            let app = axum::Router::new().fallback(|body: Bytes| async move {
                drop(body);
                "ok"
            });
            axum::serve(listener, app).await.unwrap();
        });
}

/// One side of a comparison: where to send, or `cat` spawned by this program.
#[derive(Clone)]
enum Target {
    Http {
        addr: SocketAddr,
        path: &'static str,
    },
    SpawnCat,
}

struct Case {
    name: &'static str,
    ceiling_label: &'static str,
    ceiling: Target,
    subject: Target,
    /// The processes whose CPU time each side's requests cost (none for `cat`).
    ceiling_pids: Vec<u32>,
    subject_pids: Vec<u32>,
}

async fn bench() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let seconds: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2.0);
    let run = Duration::from_secs_f64(seconds);
    let wanted: Option<Vec<String>> = std::env::var("BENCH_CASES")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let want = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|c| c == name));
    let me = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The backend of the `url` function and of the external provider.
    let mut backend = Command::new(&me)
        .arg("--noop-backend")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let backend_addr: SocketAddr = {
        let mut lines = BufReader::new(backend.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().expect("backend exited");
        line.trim_start_matches("listening on ").parse().unwrap()
    };

    // The local gateway, and the external-provider gateway in front of the backend.
    let config = dir.path().join("local.toml");
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

[[functions]]
name = "echo"
runtime = "http"
command = "{me} --noop-backend"
labels = {{ "com.openfaas.scale.min" = "1", "com.openfaas.scale.max" = "1" }}

[[functions]]
name = "raw"
runtime = "url"
url = "http://{backend_addr}"

[[functions]]
name = "cat"
runtime = "process"
command = "cat"
"#,
            state = dir.path().join("state").display(),
            secrets = dir.path().join("secrets").display(),
            me = me.display(),
        ),
    )
    .unwrap();
    let support::Gateway {
        child: mut local,
        addr: local_addr,
        ..
    } = start_gateway(&config).await;
    let external_config = dir.path().join("external.toml");
    std::fs::write(
        &external_config,
        format!(
            r#"
[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "{state}"
provider_url = "http://{backend_addr}"
"#,
            state = dir.path().join("state-external").display(),
        ),
    )
    .unwrap();
    let support::Gateway {
        child: mut external,
        addr: external_addr,
        ..
    } = start_gateway(&external_config).await;
    let local_pid = local.id().unwrap();

    // The `http` function's replica: its port is in its log.
    let replica_addr = find_replica(local_addr).await;
    wait_until_ok(local_addr, "/function/echo").await;
    wait_until_ok(local_addr, "/function/raw").await;
    wait_until_ok(external_addr, "/function/raw").await;

    let mut nginx = Nginx::start(dir.path(), backend_addr, replica_addr).await;

    // Idle: after the functions are ready and a few requests, before the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(local_pid);
    let peak = Arc::new(AtomicU64::new(idle_rss));
    let sampling = Arc::new(AtomicBool::new(true));
    {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(local_pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    let http = |addr, path| Target::Http { addr, path };
    let nginx_pids = nginx.pids();
    let external_pid = external.id().unwrap();
    let cases = [
        Case {
            name: "http",
            ceiling_label: "nginx",
            ceiling: http(nginx.to_replica, "/function/echo"),
            subject: http(local_addr, "/function/echo"),
            ceiling_pids: nginx_pids.clone(),
            subject_pids: vec![local_pid],
        },
        Case {
            name: "url",
            ceiling_label: "nginx",
            ceiling: http(nginx.to_backend, "/function/raw"),
            subject: http(local_addr, "/function/raw"),
            ceiling_pids: nginx_pids.clone(),
            subject_pids: vec![local_pid],
        },
        Case {
            name: "external",
            ceiling_label: "nginx",
            ceiling: http(nginx.to_backend, "/function/raw"),
            subject: http(external_addr, "/function/raw"),
            ceiling_pids: nginx_pids.clone(),
            subject_pids: vec![external_pid],
        },
        Case {
            name: "process",
            ceiling_label: "spawn cat",
            ceiling: Target::SpawnCat,
            subject: http(local_addr, "/function/cat"),
            ceiling_pids: Vec::new(),
            subject_pids: Vec::new(),
        },
    ];
    println!(
        "{rounds} rounds of {seconds} s per side; POST of {} bytes; 2 CPUs shared by the load generator, the proxies and the backend; nginx {}",
        BODY.len(),
        nginx.version
    );
    println!();
    println!(
        "| case | connections | ceiling | ceiling req/s | gateway req/s | gateway / ceiling (median of rounds) | rounds | gateway p50 / p99 ms | ceiling p50 / p99 ms | CPU µs per request, gateway / ceiling | errors |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    for connections in CONNECTIONS {
        for case in cases.iter().filter(|c| want(c.name)) {
            // Warm both sides: pools filled, replicas scaled, caches hot.
            load(&case.ceiling, connections, Duration::from_millis(500)).await;
            load(&case.subject, connections, Duration::from_millis(500)).await;
            let mut ceiling_runs = Vec::new();
            let mut subject_runs = Vec::new();
            let ceiling = || measured(&case.ceiling, &case.ceiling_pids, connections, run);
            let subject = || measured(&case.subject, &case.subject_pids, connections, run);
            for round in 0..rounds {
                if round % 2 == 0 {
                    ceiling_runs.push(ceiling().await);
                    subject_runs.push(subject().await);
                } else {
                    subject_runs.push(subject().await);
                    ceiling_runs.push(ceiling().await);
                }
            }
            let ratios: Vec<f64> = subject_runs
                .iter()
                .zip(&ceiling_runs)
                .map(|(s, c)| s.rps / c.rps.max(f64::MIN_POSITIVE))
                .collect();
            let errors: u64 = subject_runs
                .iter()
                .chain(&ceiling_runs)
                .map(|r| r.errors)
                .sum();
            let last = |runs: &[Run]| {
                let mid = median_run(runs);
                format!("{:.2} / {:.2}", mid.p50_ms, mid.p99_ms)
            };
            let cpu = |runs: &[Run]| match runs.iter().filter_map(|r| r.cpu_us).collect::<Vec<_>>()
            {
                v if v.is_empty() => "–".to_owned(),
                v => format!("{:.1}", median(v)),
            };
            println!(
                "| {} | {connections} | {} | {:.0} | {:.0} | **{:.2}** | {} | {} | {} | {} / {} | {errors} |",
                case.name,
                case.ceiling_label,
                median(ceiling_runs.iter().map(|r| r.rps).collect()),
                median(subject_runs.iter().map(|r| r.rps).collect()),
                median(ratios.clone()),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                last(&subject_runs),
                last(&ceiling_runs),
                cpu(&subject_runs),
                cpu(&ceiling_runs),
            );
        }
    }
    sampling.store(false, Ordering::Relaxed);
    println!();
    println!(
        "local gateway RSS: {:.1} MiB idle, {:.1} MiB peak under load",
        idle_rss as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0
    );

    nginx.stop().await;
    stop_gateway(&mut local).await;
    stop_gateway(&mut external).await;
    let _ = backend.kill().await;
}

/// The `http` function's replica address, from its log line `listening on ...`.
async fn find_replica(gateway: SocketAddr) -> SocketAddr {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        let logs = client
            .get(format!("http://{gateway}/system/logs?name=echo"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if let Some(addr) = logs
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|a| a.parse().ok())
        {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the http function's replica did not start within 60 s");
}

async fn wait_until_ok(addr: SocketAddr, path: &'static str) {
    let target = Target::Http { addr, path };
    for _ in 0..600 {
        if load(&target, 1, Duration::from_millis(1)).await.errors == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr}{path} does not answer 2xx within 60 s");
}

/// nginx from a generated config, in front of the backend and the replica.
struct Nginx {
    child: Child,
    to_backend: SocketAddr,
    to_replica: SocketAddr,
    version: String,
}

impl Nginx {
    async fn start(dir: &std::path::Path, backend: SocketAddr, replica: SocketAddr) -> Self {
        ensure_nginx().await;
        let version = Command::new("nginx")
            .arg("-v")
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        let root = dir.join("nginx");
        std::fs::create_dir_all(&root).unwrap();
        // Ports picked here and released for nginx to bind: a benchmark can afford the
        // small race, and nginx failing to start is reported.
        let to_backend = free_addr();
        let to_replica = free_addr();
        let location = |upstream: &str| {
            format!(
                "location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; \
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; \
                 proxy_set_header X-Forwarded-Host $host; }}"
            )
        };
        let workers = std::env::var("BENCH_NGINX_WORKERS").unwrap_or_else(|_| "1".into());
        let conf = format!(
            r#"
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    upstream backend {{ server {backend}; keepalive 128; keepalive_requests 1000000; }}
    upstream replica {{ server {replica}; keepalive 128; keepalive_requests 1000000; }}
    server {{ listen {to_backend}; {b} }}
    server {{ listen {to_replica}; {r} }}
}}
"#,
            root = root.display(),
            b = location("backend"),
            r = location("replica"),
        );
        let path = root.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(root.join("error.log"))
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let nginx = Self {
            child,
            to_backend,
            to_replica,
            version,
        };
        wait_until_ok(to_backend, "/function/raw").await;
        wait_until_ok(to_replica, "/function/echo").await;
        nginx
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.id() else {
            return Vec::new();
        };
        let mut pids = vec![master];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                });
            if parent == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Installs nginx from Debian when it is not there (the machine runs as root).
async fn ensure_nginx() {
    if Command::new("nginx").arg("-v").output().await.is_ok() {
        return;
    }
    let install = || async {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if !install().await {
        let _ = Command::new("apt-get").arg("update").status().await;
        assert!(install().await, "cannot install nginx with apt-get");
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time (user and system) of the proxy's processes per request served.
    cpu_us: Option<f64>,
}

/// [`load`], and the CPU time `pids` spent meanwhile, per request.
async fn measured(target: &Target, pids: &[u32], connections: usize, duration: Duration) -> Run {
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let mut run = load(target, connections, duration).await;
    let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let requests = run.rps * duration.as_secs_f64();
    if !pids.is_empty() && requests > 0.0 {
        // USER_HZ is 100 on Linux: a tick is 10 ms.
        run.cpu_us = Some((after - before) as f64 * 10_000.0 / requests);
    }
    run
}

/// utime + stime of `pid`, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name may hold spaces; fields are counted after its `)`.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// `connections` loops for `duration`, each on a connection of its own for `Http`
/// (reopened after an error), or spawning `cat` for `SpawnCat`.
async fn load(target: &Target, connections: usize, duration: Duration) -> Run {
    let began = Instant::now();
    let deadline = began + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            match target {
                Target::Http { addr, path } => {
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
                        let started = Instant::now();
                        let request = http::Request::post(path)
                            .header(http::header::HOST, "bench")
                            .body(Full::new(Bytes::from_static(BODY)))
                            .unwrap();
                        let ok = match s.send_request(request).await {
                            Ok(response) => {
                                let status = response.status();
                                response.into_body().collect().await.is_ok() && status.is_success()
                            }
                            Err(_) => {
                                sender = None;
                                false
                            }
                        };
                        if ok {
                            latencies.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
                Target::SpawnCat => {
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        if spawn_cat().await {
                            latencies.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = began.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Run {
        rps: latencies.len() as f64 / elapsed,
        errors,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        cpu_us: None,
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

/// What the `process` runtime does per request, without the gateway: spawn `cat`, write
/// the body, read the answer.
async fn spawn_cat() -> bool {
    let Ok(mut child) = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(BODY).await;
    }
    child
        .wait_with_output()
        .await
        .is_ok_and(|o| o.status.success() && o.stdout == BODY)
}

fn median_run(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted[sorted.len() / 2]
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
