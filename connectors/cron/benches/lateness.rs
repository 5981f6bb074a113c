//! Lateness of firings with 1,000 functions on `@every 1s`.
//!
//! ```text
//! cargo bench -p cron-connector --bench lateness
//! ```
//!
//! This process plays the gateway and the functions (a real HTTP server); the connector is
//! the real `cron-connector` binary, built in release, in its own process. Lateness is
//! measured end to end: the wall-clock time a function receives its call minus the tick's
//! scheduled time (`ce-time`), so it includes the HTTP round trip. Resident memory is the
//! connector process's (`VmRSS`, `VmHWM`).
//!
//! `BENCH_FUNCTIONS` changes the number of functions. `BENCH_CALLGRIND=<file>` runs the
//! connector under `valgrind --tool=callgrind` instead, counting its instructions only
//! during the measured window, and prints them per firing: a figure that does not move
//! with the machine's load, for comparing two builds (callgrind slows the connector
//! about fifty times, so use a few hundred functions at most; lateness is then
//! meaningless). The connector is stopped with SIGTERM so that callgrind writes its file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use connector_sdk::testing::{FakeGateway, Reply};

const DEFAULT_FUNCTIONS: usize = 1_000;
const WARM_UP: Duration = Duration::from_secs(4);
const MEASURE: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() {
    let functions: usize = std::env::var("BENCH_FUNCTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FUNCTIONS);
    let callgrind = std::env::var("BENCH_CALLGRIND").ok();
    let gw = FakeGateway::start().await.unwrap();
    // (scheduled, arrived, lateness) of every call.
    let samples: Arc<Mutex<Vec<(SystemTime, SystemTime, Duration)>>> = Arc::default();
    for i in 0..functions {
        let samples = samples.clone();
        gw.function_with_annotations(
            &format!("tick-{i:04}"),
            &[("topic", "cron-function"), ("schedule", "@every 1s")],
            move |req, _| {
                let arrived = SystemTime::now();
                if let Some(t) = req.header("ce-time") {
                    let scheduled = humantime::parse_rfc3339(&t).unwrap();
                    let late = arrived.duration_since(scheduled).unwrap_or_default();
                    samples.lock().unwrap().push((scheduled, arrived, late));
                }
                Reply::ok()
            },
        );
    }
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cron.toml");
    std::fs::write(
        &config,
        format!(
            "[connector]\ngateway_url = \"{}\"\nmetrics_addr = \"{metrics}\"\n",
            gw.url()
        ),
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_cron-connector");
    let mut command = match &callgrind {
        Some(out) => {
            let mut c = Command::new("valgrind");
            c.arg("--tool=callgrind")
                .arg("--instr-atstart=no")
                .arg(format!("--callgrind-out-file={out}"))
                .arg(format!("--log-file={out}.log"))
                .arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss(pid, "VmRSS");
    tokio::time::sleep(WARM_UP).await;
    if callgrind.is_some() {
        toggle_collection(pid, "on");
    }
    let start = SystemTime::now();
    tokio::time::sleep(MEASURE).await;
    if callgrind.is_some() {
        toggle_collection(pid, "off");
    }
    let end = SystemTime::now();
    let load_rss = rss(pid, "VmRSS");
    let peak_rss = rss(pid, "VmHWM");
    if callgrind.is_some() {
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
    } else {
        child.kill().ok();
    }
    child.wait().ok();
    if let Some(out) = &callgrind {
        let arrived = samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, arrived, _)| *arrived >= start && *arrived < end)
            .count();
        let instructions = callgrind_total(out);
        println!(
            "callgrind: {instructions} instructions in the window, {arrived} calls arrived, {:.0} per call",
            instructions as f64 / arrived.max(1) as f64
        );
        return;
    }

    let mut late: Vec<Duration> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(scheduled, _, _)| *scheduled >= start && *scheduled < end)
        .map(|(_, _, l)| *l)
        .collect();
    late.sort();
    let ticks = MEASURE.as_secs() as usize;
    let pct = |p: f64| late[((late.len() as f64 * p) as usize).min(late.len() - 1)];
    println!("functions: {functions} on @every 1s, measured over {ticks} s");
    println!(
        "firings: {} (expected about {})",
        late.len(),
        functions * ticks
    );
    println!(
        "lateness end to end: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        late.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "connector resident memory: idle {:.1} MiB, under load {:.1} MiB, peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        load_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
}

/// Turns callgrind's instruction counting in the connector on or off.
fn toggle_collection(pid: u32, state: &str) {
    let status = Command::new("callgrind_control")
        .arg(format!("--instr={state}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "callgrind_control --instr={state} failed");
}

/// The instructions callgrind counted while instrumentation was on, from the
/// `Collected :` line of its log (`<file>.log`).
fn callgrind_total(file: &str) -> u64 {
    let log = std::fs::read_to_string(format!("{file}.log")).unwrap();
    log.lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, v)| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn rss(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
