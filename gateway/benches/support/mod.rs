//! What the gateway's benchmarks share: the release gateway started on a config and its
//! addresses read from its log, its stop, and small statistics.
#![allow(dead_code)] // each bench uses its part

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A release gateway started by [`start_gateway`].
pub struct Gateway {
    pub child: Child,
    /// Its API.
    pub addr: SocketAddr,
    /// Its `/metrics`.
    pub metrics: SocketAddr,
}

/// Starts the release `gateway` binary on `config`, in the config's directory, and reads
/// its API and metrics addresses from its log. `BENCH_GATEWAY_LOG` (a `RUST_LOG` filter)
/// echoes its log to stderr; `BENCH_GATEWAY_WORKERS` sets its runtime's worker threads.
pub async fn start_gateway(config: &Path) -> Gateway {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    if let Ok(workers) = std::env::var("BENCH_GATEWAY_WORKERS") {
        command.env("TOKIO_WORKER_THREADS", workers);
    }
    if let Some(dir) = config.parent().filter(|d| !d.as_os_str().is_empty()) {
        command.current_dir(dir);
    }
    let echo = std::env::var("BENCH_GATEWAY_LOG").ok();
    let mut child = command
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            echo.clone().unwrap_or_else(|| "warn,gateway=info".into()),
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway binary");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, metrics) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("gateway exited");
            if let Some(rest) = line.split("gateway listening addr=").nth(1) {
                let mut words = rest.split_whitespace();
                let addr = words.next().unwrap().parse().unwrap();
                let metrics = words
                    .next()
                    .and_then(|w| w.strip_prefix("metrics="))
                    .unwrap()
                    .parse()
                    .unwrap();
                break (addr, metrics);
            }
        }
    })
    .await
    .expect("the gateway listens within 30 s");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo.is_some() {
                eprintln!("{line}");
            }
        }
    });
    Gateway {
        child,
        addr,
        metrics,
    }
}

/// SIGTERM, so the gateway stops its functions and connectors and closes its store
/// before it exits; waits up to 30 s.
pub async fn stop_gateway(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

/// A loopback address free now (the small race before someone binds it is acceptable in
/// a benchmark; a failed bind is reported).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The median (upper of the middle two).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The `q` quantile of sorted `values` (nearest rank); NaN when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
