//! cron-connector end to end: the real binary, a real HTTP server playing the gateway and
//! the functions, and the machine's real Redis for the multi-replica tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use integration_tests::redis_broker::OwnRedis;
use integration_tests::scenarios::eventually_async;
use integration_tests::{
    FakeGateway, Process, Reply, binary, eventually, free_addr, http_get, metric, redis_url,
    unique, wait_http,
};

const CRON: &[(&str, &str)] = &[("topic", "cron-function")];

fn cron_binary() -> std::path::PathBuf {
    binary("cron-connector", "cron-connector")
}

struct Cron {
    process: Process,
    metrics: SocketAddr,
}

async fn start(gw: &FakeGateway, extra: &str, env: &[(&str, &str)]) -> Cron {
    start_waiting_for(gw, extra, env, "/readyz").await
}

/// Starts the connector and waits until `path` answers 200 (`/healthz` for one that is
/// not meant to be ready).
async fn start_waiting_for(
    gw: &FakeGateway,
    extra: &str,
    env: &[(&str, &str)],
    path: &str,
) -> Cron {
    let metrics = free_addr();
    let config = format!(
        r#"[connector]
gateway_url = "{}"
metrics_addr = "{metrics}"
rebuild_interval = "200ms"
max_attempts = 2
drain_timeout = "5s"

[connector.backoff]
initial = "50ms"
max = "100ms"

{extra}
"#,
        gw.url()
    );
    let process = Process::start(&cron_binary(), &config, env);
    assert!(
        wait_http(metrics, path, 200, Duration::from_secs(30)).await,
        "cron-connector: {path} not 200:\n{}",
        process.output()
    );
    Cron { process, metrics }
}

fn annotations<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    CRON.iter().chain(extra).copied().collect()
}

fn ce_time(r: &integration_tests::Received) -> SystemTime {
    humantime::parse_rfc3339(&r.header("ce-time").unwrap()).unwrap()
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

async fn metrics_text(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
        .await
        .map(|(_, t)| t)
        .unwrap_or_default()
}

#[tokio::test]
async fn fires_on_time_with_the_contract_headers() {
    let gw = FakeGateway::start().await.unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let log = arrivals.clone();
    gw.function_with_annotations(
        "every-second",
        &annotations(&[("schedule", "* * * * * *")]),
        move |req, _| {
            log.lock()
                .unwrap()
                .push((req.header("ce-time").unwrap(), SystemTime::now()));
            Reply::ok()
        },
    );
    gw.function_with_annotations(
        "every-two",
        &annotations(&[("schedule", "@every 2s")]),
        |_, _| Reply::ok(),
    );
    let cron = start(&gw, "", &[]).await;
    assert!(
        eventually(Duration::from_secs(15), || gw
            .requests_to("every-second")
            .len()
            >= 4
            && gw.requests_to("every-two").len() >= 2)
        .await,
        "not firing:\n{}",
        cron.process.output()
    );
    for r in gw.requests_to("every-second") {
        assert_eq!(r.header("x-topic").as_deref(), Some("cron-function"));
        assert_eq!(r.header("x-connector").as_deref(), Some("cron-connector"));
        assert_eq!(r.header("x-cron-schedule").as_deref(), Some("* * * * * *"));
        assert_eq!(r.header("ce-specversion").as_deref(), Some("1.0"));
        let t = ce_time(&r);
        assert_eq!(unix_ms(t) % 1000, 0, "ce-time is the scheduled second");
        assert_eq!(
            r.header("ce-id").unwrap(),
            format!("every-second/{}", r.header("ce-time").unwrap())
        );
    }
    for r in gw.requests_to("every-two") {
        assert_eq!(
            unix_ms(ce_time(&r)) % 2000,
            0,
            "@every 2s ticks on even seconds"
        );
    }
    // Consecutive ticks, one second apart, each invoked soon after its time.
    let ticks: Vec<u128> = gw
        .requests_to("every-second")
        .iter()
        .map(|r| unix_ms(ce_time(r)))
        .collect();
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "{ticks:?}");
    }
    for (scheduled, arrived) in arrivals.lock().unwrap().iter() {
        let scheduled = humantime::parse_rfc3339(scheduled).unwrap();
        let late = arrived.duration_since(scheduled).unwrap_or_default();
        assert!(late < Duration::from_millis(900), "fired {late:?} late");
    }
    let text = metrics_text(cron.metrics).await;
    assert!(
        metric(
            &text,
            "connector_cron_firings_total{function=\"every-second\",outcome=\"delivered\"}"
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{text}"
    );
    assert!(text.contains("connector_cron_lateness_seconds_bucket"));
    assert!(text.contains("connector_cron_next_fire_timestamp_seconds{function=\"every-second\"}"));
    assert_eq!(
        metric(&text, "connector_cron_scheduled_functions"),
        Some(2.0)
    );
}

#[tokio::test]
async fn schedules_follow_annotation_changes_without_a_restart() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations("a", &annotations(&[("schedule", "* * * * * *")]), |_, _| {
        Reply::ok()
    });
    let cron = start(&gw, "", &[]).await;
    assert!(eventually(Duration::from_secs(10), || gw.requests_to("a").len() >= 2).await);

    // Change a's schedule to even seconds only.
    gw.set_annotations("a", &annotations(&[("schedule", "*/2 * * * * *")]));
    let changed_at = SystemTime::now() + Duration::from_secs(1);
    assert!(
        eventually(Duration::from_secs(15), || {
            gw.requests_to("a")
                .iter()
                .filter(|r| ce_time(r) > changed_at)
                .count()
                >= 2
        })
        .await,
        "{}",
        cron.process.output()
    );
    assert!(
        gw.requests_to("a")
            .iter()
            .filter(|r| ce_time(r) > changed_at)
            .all(|r| unix_ms(ce_time(r)).is_multiple_of(2000)),
        "the new schedule is not in force"
    );

    // Remove a, add b: b starts, a stops.
    gw.remove_function("a");
    gw.function_with_annotations("b", &annotations(&[("schedule", "* * * * * *")]), |_, _| {
        Reply::ok()
    });
    let removed_at = SystemTime::now() + Duration::from_secs(1);
    assert!(eventually(Duration::from_secs(15), || gw.requests_to("b").len() >= 3).await);
    assert!(
        gw.requests_to("a").iter().all(|r| ce_time(r) <= removed_at),
        "a removed function kept firing"
    );
}

#[tokio::test]
async fn an_invalid_schedule_is_logged_counted_and_isolated() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "bad",
        &annotations(&[("schedule", "every tuesday-ish")]),
        |_, _| Reply::ok(),
    );
    gw.function_with_annotations(
        "good",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok(),
    );
    let cron = start(&gw, "", &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || gw.requests_to("good").len()
            >= 2)
        .await
    );
    assert!(gw.requests_to("bad").is_empty());
    let text = metrics_text(cron.metrics).await;
    assert_eq!(
        metric(&text, "connector_cron_invalid_schedules"),
        Some(1.0),
        "{text}"
    );
    let output = cron.process.output();
    let line = output
        .lines()
        .find(|l| l.contains("invalid schedule"))
        .unwrap_or_else(|| panic!("no error logged:\n{output}"));
    assert!(
        line.contains("bad") && line.contains("every tuesday-ish"),
        "{line}"
    );
    assert_eq!(
        output.matches("invalid schedule").count(),
        1,
        "logged on every rebuild instead of once"
    );
}

#[tokio::test]
async fn forbid_skips_a_tick_while_the_previous_run_goes_on() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "slow",
        &annotations(&[("schedule", "* * * * * *"), ("cron.overlap", "forbid")]),
        |_, _| Reply::ok().delay(Duration::from_millis(2500)),
    );
    let cron = start(&gw, "", &[]).await;
    let skipped = "connector_cron_firings_total{function=\"slow\",outcome=\"skipped_overlap\"}";
    let mut text = String::new();
    for _ in 0..150 {
        text = metrics_text(cron.metrics).await;
        if metric(&text, skipped).unwrap_or(0.0) >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&text, skipped).unwrap_or(0.0) >= 2.0, "{text}");
    assert_eq!(
        gw.max_inflight(),
        1,
        "two runs of a forbid function overlapped"
    );
}

#[tokio::test]
async fn allow_lets_runs_overlap() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "slow",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok().delay(Duration::from_millis(2500)),
    );
    let _cron = start(&gw, "", &[]).await;
    assert!(eventually(Duration::from_secs(10), || gw.max_inflight() >= 2).await);
}

fn lock_section(prefix: &str, lease: &str) -> String {
    format!(
        "[lock]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\nlease = \"{lease}\"\n",
        redis_url()
    )
}

#[tokio::test]
async fn three_replicas_fire_each_tick_exactly_once() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "ha",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok(),
    );
    let lock = lock_section(&unique("cron-ha"), "2s");
    let mut replicas = Vec::new();
    for i in 0..3 {
        let id = format!("replica-{i}");
        replicas.push(start(&gw, &lock, &[("lock_replica_id", &id)]).await);
    }
    let distinct = |gw: &FakeGateway| {
        gw.requests_to("ha")
            .iter()
            .filter_map(|r| r.header("ce-id"))
            .collect::<BTreeSet<_>>()
            .len()
    };
    assert!(
        eventually(Duration::from_secs(20), || distinct(&gw) >= 6).await,
        "{}",
        replicas[0].process.output()
    );
    for r in &mut replicas {
        assert!(r.process.terminate(Duration::from_secs(15)).await.success());
    }
    let mut per_tick: BTreeMap<String, usize> = BTreeMap::new();
    for r in gw.requests_to("ha") {
        *per_tick.entry(r.header("ce-id").unwrap()).or_default() += 1;
    }
    let duplicated: Vec<_> = per_tick.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "ticks fired more than once: {duplicated:?}"
    );
    // No tick lost between the first and the last.
    let mut ticks: Vec<u128> = gw
        .requests_to("ha")
        .iter()
        .map(|r| unix_ms(ce_time(r)))
        .collect();
    ticks.sort();
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "a tick was lost: {ticks:?}");
    }
}

#[tokio::test]
async fn a_replica_killed_mid_firing_loses_no_tick() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "takeover",
        &annotations(&[("schedule", "*/3 * * * * *")]),
        |_, _| Reply::ok().delay(Duration::from_millis(1500)),
    );
    let lock = lock_section(&unique("cron-kill"), "1s");
    let mut replicas = Vec::new();
    for i in 0..3 {
        let id = format!("replica-{i}");
        replicas.push(start(&gw, &lock, &[("lock_replica_id", &id)]).await);
    }
    // Only replicas running at a tick watch it: pick a tick after all three were up.
    let all_up = SystemTime::now();
    let after_all_up = |gw: &FakeGateway| {
        gw.requests_to("takeover")
            .into_iter()
            .find(|r| ce_time(r) > all_up)
    };
    assert!(eventually(Duration::from_secs(15), || after_all_up(&gw).is_some()).await);
    let first = after_all_up(&gw).unwrap();
    let victim_id = first.header("x-cron-replica").unwrap();
    let tick = first.header("ce-id").unwrap();
    let victim: usize = victim_id.trim_start_matches("replica-").parse().unwrap();
    replicas[victim].process.kill();
    // A survivor takes the tick over once the victim's lease lapses.
    assert!(
        eventually(Duration::from_secs(10), || {
            gw.requests_to("takeover").iter().any(|r| {
                r.header("ce-id").as_deref() == Some(tick.as_str())
                    && r.header("x-cron-replica").as_deref() != Some(victim_id.as_str())
            })
        })
        .await,
        "tick {tick} was lost with replica {victim_id}:\n{}",
        replicas[(victim + 1) % 3].process.output()
    );
    // Later ticks go on, once each.
    let later = |gw: &FakeGateway| {
        gw.requests_to("takeover")
            .iter()
            .filter_map(|r| r.header("ce-id"))
            .filter(|id| *id > tick)
            .collect::<Vec<_>>()
    };
    assert!(eventually(Duration::from_secs(15), || later(&gw).len() >= 2).await);
    let later = later(&gw);
    let distinct: BTreeSet<_> = later.iter().collect();
    assert_eq!(
        distinct.len(),
        later.len(),
        "duplicates after the takeover: {later:?}"
    );
}

/// A `[lock]` on `url` with a one-second lease and `extra` lines.
fn lock_on(url: &str, extra: &str) -> String {
    format!(
        "[lock]\nredis_url = \"{url}\"\nkey_prefix = \"{}\"\nlease = \"1s\"\n{extra}\n",
        unique("cron-unreachable")
    )
}

/// Issue 17: with a lock configured and its Redis unreachable, replicas used to fire
/// every tick each (three replicas: three invocations per tick). A tick is now skipped,
/// logged and counted until the lease store answers, then firing resumes, once per tick.
#[tokio::test]
async fn an_unreachable_lock_store_skips_ticks_until_it_answers() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "locked",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok(),
    );
    // A free port: nothing listens there until `start`.
    let mut own = OwnRedis::new();
    let cron = start_waiting_for(&gw, &lock_on(&own.url(), ""), &[], "/healthz").await;
    // It fires nothing, so it is not ready, and says why.
    let (status, body) = http_get(cron.metrics, "/readyz").await.unwrap();
    assert_eq!(status, 503, "ready without its lease store: {body}");
    assert!(body.contains("source not connected"), "{body}");
    let series =
        "connector_cron_firings_total{function=\"locked\",outcome=\"skipped_lock_unavailable\"}";
    let skipped = || async { metric(&metrics_text(cron.metrics).await, series).unwrap_or(0.0) };
    assert!(
        eventually_async(Duration::from_secs(20), || async { skipped().await >= 3.0 }).await,
        "ticks not counted as skipped:\n{}\n{}",
        metrics_text(cron.metrics).await,
        cron.process.output()
    );
    assert!(
        gw.requests_to("locked").is_empty(),
        "fired without the lock: {:?}",
        gw.requests_to("locked")
    );
    let output = cron.process.output();
    assert!(
        output.contains("tick skipped")
            && output.contains("function=locked")
            && output.contains("schedule=* * * * * *"),
        "{output}"
    );

    // Redis comes back: the replica reconnects (with backoff), is ready, and fires again.
    own.start().await;
    let back = skipped().await;
    assert!(
        wait_http(cron.metrics, "/readyz", 200, Duration::from_secs(30)).await,
        "not ready once Redis answered:\n{}",
        cron.process.output()
    );
    assert!(
        eventually(Duration::from_secs(30), || gw.requests_to("locked").len()
            >= 3)
        .await,
        "firing did not resume once Redis answered:\n{}",
        cron.process.output()
    );
    let ids: Vec<String> = gw
        .requests_to("locked")
        .iter()
        .filter_map(|r| r.header("ce-id"))
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a tick fired twice: {ids:?}");
    assert!(skipped().await >= back);
}

/// Firing without the lock is an explicit choice: `lock.on_unavailable = "fire"`.
#[tokio::test]
async fn an_unreachable_lock_store_fires_anyway_when_asked_to() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "unlocked",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok(),
    );
    let nowhere = OwnRedis::new();
    let cron = start(
        &gw,
        &lock_on(&nowhere.url(), "on_unavailable = \"fire\""),
        &[],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || gw.requests_to("unlocked").len()
            >= 2)
        .await,
        "not firing:\n{}",
        cron.process.output()
    );
    let output = cron.process.output();
    assert!(output.contains("firing without it"), "{output}");
    assert_eq!(
        http_get(cron.metrics, "/readyz").await.unwrap().0,
        200,
        "firing without the lock is working: ready"
    );
}

/// `POST http://{addr}/drain`, with `Authorization: Bearer {token}` when given: the status.
async fn post_drain(addr: SocketAddr, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().post(format!("http://{addr}/drain"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

/// Issue 17: `/drain` on the metrics port stopped the connector for anyone who could
/// reach it. Without a drain token it is off; with one (here the `drain_token` variable)
/// only `POST` with the bearer token drains, and the process then exits 0.
#[tokio::test]
async fn drain_over_http_needs_the_token_then_the_process_exits_0() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "tick",
        &annotations(&[("schedule", "@every 1s")]),
        |_, _| Reply::ok(),
    );
    let mut open = start(&gw, "", &[]).await;
    assert_eq!(http_get(open.metrics, "/drain").await.unwrap().0, 404);
    assert_eq!(post_drain(open.metrics, None).await, 404);
    assert_eq!(post_drain(open.metrics, Some("anything")).await, 404);
    assert_eq!(http_get(open.metrics, "/readyz").await.unwrap().0, 200);
    assert!(open.process.exited().is_none(), "stopped without a token");
    assert!(
        open.process
            .terminate(Duration::from_secs(15))
            .await
            .success()
    );

    let mut guarded = start(&gw, "", &[("drain_token", "dr4in-t0ken")]).await;
    assert_eq!(http_get(guarded.metrics, "/drain").await.unwrap().0, 405);
    assert_eq!(post_drain(guarded.metrics, None).await, 401);
    assert_eq!(post_drain(guarded.metrics, Some("dr4in-t0kem")).await, 401);
    assert_eq!(http_get(guarded.metrics, "/readyz").await.unwrap().0, 200);
    assert!(
        guarded.process.exited().is_none(),
        "stopped by a refused request"
    );
    assert_eq!(post_drain(guarded.metrics, Some("dr4in-t0ken")).await, 200);
    let status = guarded.process.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    let output = guarded.process.output();
    assert!(output.contains("/drain refused"), "{output}");
    assert!(
        !output.contains("dr4in-t0ke"),
        "the token was logged:\n{output}"
    );
}

fn signal(process: &Process, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &process.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Stops the connector for `pause` (SIGSTOP), resumes it, and returns the wall-clock
/// window of the stall.
async fn stall(cron: &Cron, pause: Duration) -> (SystemTime, SystemTime) {
    signal(&cron.process, "STOP");
    let stopped = SystemTime::now();
    tokio::time::sleep(pause).await;
    let resumed = SystemTime::now();
    signal(&cron.process, "CONT");
    (stopped, resumed)
}

#[tokio::test]
async fn misfire_skip_fires_nothing_for_a_stall() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "stalled",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::ok(),
    );
    let cron = start(&gw, "", &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || gw.requests_to("stalled").len()
            >= 2)
        .await
    );
    let (stopped, resumed) = stall(&cron, Duration::from_millis(3500)).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            gw.requests_to("stalled")
                .iter()
                .any(|r| ce_time(r) > resumed)
        })
        .await
    );
    let in_stall = gw
        .requests_to("stalled")
        .iter()
        .filter(|r| ce_time(r) > stopped + Duration::from_secs(1) && ce_time(r) < resumed)
        .count();
    assert_eq!(in_stall, 0, "skip fired ticks missed during the stall");
    let text = metrics_text(cron.metrics).await;
    assert!(
        metric(&text, "connector_cron_misfires_total{function=\"stalled\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
}

#[tokio::test]
async fn misfire_fire_once_fires_the_latest_missed_tick_once() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "stalled",
        &annotations(&[("schedule", "* * * * * *"), ("cron.misfire", "fire_once")]),
        |_, _| Reply::ok(),
    );
    let cron = start(&gw, "", &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || gw.requests_to("stalled").len()
            >= 2)
        .await
    );
    let (stopped, resumed) = stall(&cron, Duration::from_millis(3500)).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            gw.requests_to("stalled")
                .iter()
                .any(|r| ce_time(r) > resumed)
        })
        .await
    );
    let in_stall: Vec<_> = gw
        .requests_to("stalled")
        .iter()
        .map(ce_time)
        .filter(|t| *t > stopped + Duration::from_secs(1) && *t < resumed)
        .collect();
    assert_eq!(
        in_stall.len(),
        1,
        "fire_once fired {} missed ticks",
        in_stall.len()
    );
}

#[tokio::test]
async fn a_broken_config_fails_at_start_naming_file_line_and_key() {
    let config =
        "[connector]\ngateway_url = \"http://127.0.0.1:1\"\n\n[cron]\nmisfire = \"sometimes\"\n";
    let mut process = Process::start(&cron_binary(), config, &[]);
    let status = process.wait(Duration::from_secs(20)).await;
    assert!(!status.success());
    let output = process.output();
    assert!(output.contains("cron.misfire"), "{output}");
    assert!(output.contains("config.toml"), "{output}");
    assert!(output.contains("line 5"), "{output}");

    let mut process = Process::start(&cron_binary(), "[connector]\n", &[("max_inflight", "lots")]);
    let status = process.wait(Duration::from_secs(20)).await;
    assert!(!status.success());
    assert!(
        process
            .output()
            .contains("environment variable max_inflight"),
        "{}",
        process.output()
    );
}

#[tokio::test]
async fn a_firing_that_exhausts_its_attempts_is_logged_and_counted() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "broken",
        &annotations(&[("schedule", "* * * * * *")]),
        |_, _| Reply::status(500),
    );
    let cron = start(&gw, "", &[]).await;
    let failed = "connector_cron_firings_total{function=\"broken\",outcome=\"failed\"}";
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics_text(cron.metrics).await;
        if metric(&text, failed).unwrap_or(0.0) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&text, failed).unwrap_or(0.0) >= 1.0, "{text}");
    // max_attempts = 2 in these tests: each tick was tried twice, with the same ce-id.
    let first = gw.requests_to("broken")[0].header("ce-id").unwrap();
    let attempts = gw
        .requests_to("broken")
        .iter()
        .filter(|r| r.header("ce-id").as_deref() == Some(first.as_str()))
        .count();
    assert_eq!(attempts, 2);
    assert!(
        cron.process
            .output()
            .contains("firing failed after every attempt")
    );
}

/// `/admin/status` (and so the gateway's console) shows each scheduled function's
/// schedule and next three fire times; an invalid schedule shows its error.
#[tokio::test]
async fn the_admin_status_shows_the_next_fire_times() {
    let gw = FakeGateway::start().await.unwrap();
    gw.function_with_annotations(
        "ticker",
        &annotations(&[("schedule", "*/10 * * * * *")]),
        |_, _| Reply::ok(),
    );
    gw.function_with_annotations(
        "broken",
        &annotations(&[("schedule", "not a schedule")]),
        |_, _| Reply::ok(),
    );
    let cron = start(
        &gw,
        "",
        &[
            ("basic_auth", "true"),
            ("gateway_username", "admin"),
            ("gateway_password", "s3cret"),
        ],
    )
    .await;
    let status: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/admin/status", cron.metrics))
        .basic_auth("admin", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subscription = |name: &str| {
        status["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["function"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no {name}: {status}"))
            .clone()
    };
    let ticker = subscription("ticker");
    assert_eq!(ticker["details"]["schedule"], "*/10 * * * * *", "{ticker}");
    let next: Vec<SystemTime> = ticker["details"]["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| humantime::parse_rfc3339(t.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(next.len(), 3, "{ticker}");
    assert!(
        next[0] > SystemTime::now() - Duration::from_secs(1),
        "{ticker}"
    );
    for pair in next.windows(2) {
        assert_eq!(
            pair[1].duration_since(pair[0]).unwrap(),
            Duration::from_secs(10)
        );
    }
    assert!(
        unix_ms(next[0]).is_multiple_of(10_000),
        "on the tens: {ticker}"
    );
    let broken = subscription("broken");
    assert!(broken["details"]["next"]["error"].is_string(), "{broken}");
    drop(cron);
}
