//! The operator console in a real browser (issue 20): Debian's `chromium`, headless,
//! driven by `playwright-core` (`integration-tests/browser/console.mjs`; `scripts/test.sh`
//! installs both), against the real gateway supervising a real redis-connector.
//!
//! The function `flaky` answers 503 until the file `fixed` exists. The script opens
//! `/ui/` with a wrong password (401, nothing shown), then with the right one: it sees the
//! function and its topic, sees the connector's backlog rise while the function fails
//! (this test publishes when asked), filters the dead letters by function and status
//! (a payload holding markup is shown as text), and once this test has fixed the
//! function, replays them from the page; this test then checks the function got every
//! message. Last, the script deploys a function from the page, invokes it there, and
//! removes it. A supervised cron-connector gives the scheduled function `ticker` its next
//! fire time on the page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::gateway::Gateway;
use integration_tests::redis_broker::RedisStreams;
use integration_tests::scenarios::{Fixture, eventually_async};
use integration_tests::{unique, wait_http};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WITHIN: Duration = Duration::from_secs(30);
const USER: &str = "admin";
const MARKUP: &str = "<img src=x onerror=alert(1)>";

/// The recording `http` function (`functions/recording.py`): 503 until `fixed` exists.
const RECORDING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/functions/recording.py");

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_finds_and_replays_dead_letters_in_the_console() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists()
            && browser_dir().join("node_modules/playwright-core").exists(),
        "the browser tests need {chromium} and integration-tests/browser/node_modules: run scripts/test.sh, which installs them"
    );
    let fixture = RedisStreams::new();
    let topic = unique("console");
    fixture.create_topic(&topic).await;
    let password = unique("pw");
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_owned();
    std::fs::create_dir(dir.join("flaky")).unwrap();
    let connector = format!(
        r#"[connector]
metrics_addr = "127.0.0.1:0"
rebuild_interval = "500ms"
upstream_timeout = "10s"
max_attempts = 3
drain_timeout = "5s"

# Retries slow enough for the page, polling every 2 s, to see the backlog while they last.
[connector.backoff]
initial = "3s"
max = "3s"

{}
"#,
        fixture.source_config(&topic)
    );
    std::fs::write(dir.join("redis.toml"), connector).unwrap();
    std::fs::write(
        dir.join("cron.toml"),
        "[connector]\nmetrics_addr = \"127.0.0.1:0\"\nrebuild_interval = \"500ms\"\n",
    )
    .unwrap();
    let config = format!(
        r#"[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"
basic_auth = true
username = "{USER}"
password = "{password}"

[supervisor]
stop_timeout = "10s"

[[functions]]
name = "flaky"
runtime = "http"
command = "python3 {RECORDING} flaky --fail 503"
annotations = {{ topic = "{topic}" }}

[[functions]]
name = "ticker"
runtime = "process"
command = "cat"
annotations = {{ topic = "cron-function", schedule = "@every 1h" }}

[[connectors]]
name = "redis"
command = "{binary}"
config = "redis.toml"

[[connectors]]
name = "cron"
command = "{cron}"
config = "cron.toml"
"#,
        binary = fixture.binary().display(),
        cron = integration_tests::binary("cron-connector", "cron-connector").display(),
    );
    let mut gateway = Gateway::start(temp, &config, &[]);
    let addr = gateway.listening(WITHIN).await;
    let metrics = gateway.wait_connector_metrics("redis", WITHIN).await;
    assert!(
        wait_http(metrics, "/readyz", 200, WITHIN).await,
        "connector not ready:\n{}",
        gateway.output()
    );

    let sent: Vec<Vec<u8>> = vec![
        b"console-one".to_vec(),
        MARKUP.as_bytes().to_vec(),
        b"console-three".to_vec(),
    ];
    let mut script = tokio::process::Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .current_dir(browser_dir())
        .env("GATEWAY_URL", format!("http://{addr}"))
        .env("CONSOLE_USER", USER)
        .env("CONSOLE_PASSWORD", &password)
        .env("FUNCTION", "flaky")
        .env("TOPIC", &topic)
        .env("MESSAGES", sent.len().to_string())
        .env("MARKUP", MARKUP)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut stdin = script.stdin.take().unwrap();
    let mut stdout = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    let talk = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            said.push(line.clone());
            match line.trim() {
                "produce" => {
                    fixture.produce(&topic, &sent).await;
                    stdin.write_all(b"produced\n").await.unwrap();
                }
                "fix" => {
                    std::fs::write(dir.join("fixed"), "").unwrap();
                    stdin.write_all(b"fixed\n").await.unwrap();
                }
                _ => {}
            }
        }
    };
    let talked = tokio::time::timeout(Duration::from_secs(180), talk).await;
    let output = script.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        talked.is_ok()
            && output.status.success()
            && said.last().map(String::as_str) == Some("done"),
        "the browser script failed ({:?}):\nstdout: {said:?}\nstderr: {stderr}\ngateway:\n{}",
        output.status,
        gateway.output()
    );

    // The fixed function got every message, once.
    let flaky = dir.join("flaky");
    let got = || -> BTreeSet<Vec<u8>> {
        std::fs::read_dir(&flaky)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                (path.extension()? == "txt").then(|| std::fs::read(path).unwrap())
            })
            .collect()
    };
    let want: BTreeSet<Vec<u8>> = sent.iter().cloned().collect();
    assert!(
        eventually_async(WITHIN, || async { got() == want }).await,
        "the function got {} of {}",
        got().len(),
        want.len()
    );
    let status = gateway.stop(WITHIN).await;
    assert!(status.success(), "{}", gateway.output());
}
