//! The whole system as users run it: the real `gateway` binary, basic auth on, a `process`
//! function subscribed to a topic through its `topic` annotation, and a real connector
//! started by the gateway's supervisor as a `[[connectors]]` entry. Messages are published
//! with the brokers' own clients (rdkafka, redis, async-nats, aws-sdk-sqs, lapin, through the
//! fixtures in `integration_tests::*_broker`); the function writes each body it gets to a
//! file, so what the test reads back is what a user's function saw.
//!
//! - one test per connector (Kafka, Redis Streams, NATS JetStream, SQS, RabbitMQ, PostgreSQL): every payload
//!   reaches the function (at least once, nothing else), with its topic, the connector
//!   became ready (so it authenticated to `/system/functions`) and acknowledged
//!   everything, and SIGTERM to the gateway stops the connector and exits 0 (no
//!   password in any log line);
//! - a connector told to send no credentials is refused and never ready, so the
//!   readiness above does rest on basic auth;
//! - the gateway's own variables (`nats_url` for its queue) do not reconfigure the
//!   connectors it starts;
//! - `/async-function/{name}` with `X-Callback-Url`, posted directly: the embedded queue
//!   runs the function and posts its output to the test's receiver with OpenFaaS's
//!   callback headers;
//! - the same chain driven by a connector with `asynchronous_invocation` and
//!   `callback_url`: broker → connector → gateway queue → function → callback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use integration_tests::gateway::Gateway;
use integration_tests::kafka_broker::KafkaTopics;
use integration_tests::mqtt_broker::MqttTopics;
use integration_tests::nats_broker::JetStreamTopics;
use integration_tests::postgres_broker::PgTables;
use integration_tests::rabbitmq_broker::RabbitQueues;
use integration_tests::redis_broker::RedisStreams;
use integration_tests::scenarios::{Fixture, eventually_async};
use integration_tests::sqs_broker::SqsQueues;
use integration_tests::{unique, wait_http};

/// The longest any one step (start, delivery, acknowledgement, stop) may take.
/// The recording `http` function (`functions/recording.py`): see its header.
const RECORDING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/functions/recording.py");

const WITHIN: Duration = Duration::from_secs(30);

/// The user the gateway's `/system/*` routes accept.
const USER: &str = "admin";

/// The function every test deploys: it records each request (body, and the `X-Topic`,
/// `X-Connector` and `ce-id` headers the watchdog convention passes as `Http_*`
/// variables) as one JSON file in `recorded/`, written aside and renamed so a reader never
/// sees half a file, and answers `done: <body>`.
const RECORDER: &str = r#"
import json, os, sys, uuid
body = sys.stdin.buffer.read().decode("utf-8", "replace")
record = {
    "body": body,
    "topic": os.environ.get("Http_X_Topic"),
    "connector": os.environ.get("Http_X_Connector"),
    "ce_id": os.environ.get("Http_Ce_Id"),
}
name = os.path.join("recorded", uuid.uuid4().hex)
with open(name + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(name + ".tmp", name + ".json")
sys.stdout.write("done: " + body)
"#;

/// The name of the recording function.
const FUNCTION: &str = "recorder";

/// One request the recording function handled.
#[derive(Debug, Clone, serde::Deserialize)]
struct Recorded {
    body: String,
    topic: Option<String>,
    connector: Option<String>,
    ce_id: Option<String>,
}

/// How the gateway's `/system/*` credentials are given.
#[derive(Debug, Clone, Copy)]
enum Credentials {
    /// Files `basic-auth-user` and `basic-auth-password` in `secret_mount_path`, as
    /// OpenFaaS mounts its `basic-auth` secret; connectors get the same path.
    Files,
    /// `username` and `password` in the gateway's TOML; connectors get them as
    /// `gateway_username` and `gateway_password`.
    Toml,
}

/// A connector for the gateway to supervise.
struct ConnectorEntry {
    /// `[[connectors]] name`, the prefix of its log lines.
    name: &'static str,
    /// The binary.
    binary: PathBuf,
    /// Its TOML file: everything but `gateway_url` and the credentials, which the
    /// supervisor passes. Its metrics port is any free one, read from its log
    /// ([`System::metrics_addr`]): a port picked by the test could be taken by another
    /// process before the connector binds it.
    config: String,
    /// `[[connectors]] env`: variables over those the supervisor passes.
    env: Vec<(&'static str, &'static str)>,
}

impl ConnectorEntry {
    /// `fixture`'s connector consuming `topic`, with `extra` in its `[connector]` section.
    fn new(name: &'static str, fixture: &dyn Fixture, topic: &str, extra: &str) -> Self {
        let config = format!(
            r#"[connector]
metrics_addr = "127.0.0.1:0"
rebuild_interval = "500ms"
upstream_timeout = "10s"
max_inflight = 8
drain_timeout = "5s"
{extra}

[connector.backoff]
initial = "50ms"
max = "500ms"

{source}
"#,
            source = fixture.source_config(topic),
        );
        Self {
            name,
            binary: fixture.binary(),
            config,
            env: Vec::new(),
        }
    }

    /// With `name=value` in its `env`.
    fn with_env(mut self, name: &'static str, value: &'static str) -> Self {
        self.env.push((name, value));
        self
    }
}

/// The `gateway` binary with basic auth on, the recording function subscribed to one
/// topic, and its connectors. Stopped with SIGTERM when dropped, so the gateway stops
/// its connectors: a SIGKILL would leave them running (each is in its own process group).
struct System {
    gateway: Gateway,
    /// The gateway's API.
    addr: SocketAddr,
    /// The temporary directory of the gateway's config, state, secrets and the function.
    dir: PathBuf,
    password: String,
    connectors: Vec<ConnectorEntry>,
}

impl System {
    /// Like [`launch`](Self::launch), then waits until every connector is ready.
    async fn start(
        topic: &str,
        credentials: Credentials,
        connectors: Vec<ConnectorEntry>,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(topic, credentials, connectors, env, "").await
    }

    /// Like [`start`](Self::start), with `functions` (`[[functions]]` tables) deployed
    /// beside the recorder.
    async fn start_with(
        topic: &str,
        credentials: Credentials,
        connectors: Vec<ConnectorEntry>,
        env: &[(&str, &str)],
        functions: &str,
    ) -> Self {
        let system = Self::launch(topic, credentials, connectors, env, functions).await;
        for c in &system.connectors {
            let addr = system.metrics_addr(c.name).await;
            assert!(
                wait_http(addr, "/readyz", 200, WITHIN).await,
                "connector {} not ready:\n{}",
                c.name,
                system.gateway.output()
            );
        }
        system
    }

    /// Writes the gateway's config (the function subscribed to `topic`, `connectors` as
    /// `[[connectors]]`), starts the gateway with `env`, and waits until it listens.
    async fn launch(
        topic: &str,
        credentials: Credentials,
        connectors: Vec<ConnectorEntry>,
        env: &[(&str, &str)],
        functions: &str,
    ) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_owned();
        let password = unique("pw");
        std::fs::write(dir.join("recorder.py"), RECORDER).unwrap();
        std::fs::create_dir(dir.join("recorded")).unwrap();
        let auth = match credentials {
            Credentials::Files => {
                std::fs::create_dir(dir.join("auth")).unwrap();
                std::fs::write(dir.join("auth/basic-auth-user"), format!("{USER}\n")).unwrap();
                std::fs::write(
                    dir.join("auth/basic-auth-password"),
                    format!("{password}\n"),
                )
                .unwrap();
                r#"secret_mount_path = "auth""#.to_owned()
            }
            Credentials::Toml => format!("username = \"{USER}\"\npassword = \"{password}\""),
        };
        let mut entries = String::new();
        for c in &connectors {
            let file = format!("{}.toml", c.name);
            std::fs::write(dir.join(&file), &c.config).unwrap();
            let env: Vec<String> = c
                .env
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect();
            entries.push_str(&format!(
                "\n[[connectors]]\nname = \"{}\"\ncommand = \"{}\"\nconfig = \"{file}\"\nenv = {{ {} }}\n",
                c.name,
                c.binary.display(),
                env.join(", "),
            ));
        }
        // The function's command is split on spaces and runs in this directory.
        let config = format!(
            r#"[gateway]
bind = "127.0.0.1:0"
metrics_bind = "127.0.0.1:0"
state_dir = "state"
basic_auth = true
{auth}

[provider]
secrets_path = "function-secrets"

[supervisor]
stop_timeout = "10s"
backoff = {{ initial = "200ms", max = "1s" }}

[[functions]]
name = "{FUNCTION}"
runtime = "process"
command = "python3 recorder.py"
annotations = {{ topic = "{topic}" }}
{functions}
{entries}"#
        );
        let mut gateway = Gateway::start(temp, &config, env);
        let addr = gateway.listening(WITHIN).await;
        Self {
            gateway,
            addr,
            dir,
            password,
            connectors,
        }
    }

    /// Where connector `name` serves `/metrics` and `/readyz`: the address on its latest
    /// `starting ... metrics=ADDR` line (a restarted connector binds a new port).
    async fn metrics_addr(&self, name: &str) -> SocketAddr {
        self.gateway.wait_connector_metrics(name, WITHIN).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `/system/functions` refuses a request without credentials or with a wrong
    /// password, and lists the function to one with the right ones.
    async fn assert_basic_auth_is_on(&self) {
        let client = reqwest::Client::new();
        let url = self.url("/system/functions");
        let anonymous = client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "no credentials");
        let wrong = client
            .get(&url)
            .basic_auth(USER, Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "a wrong password");
        let listed: serde_json::Value = client
            .get(&url)
            .basic_auth(USER, Some(&self.password))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == FUNCTION),
            "{listed}"
        );
    }

    /// Every request the function has finished recording.
    fn recorded(&self) -> Vec<Recorded> {
        std::fs::read_dir(self.dir.join("recorded"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| read_record(&p))
            .collect()
    }

    /// Waits until the function has recorded every one of `sent`; returns what it recorded.
    async fn wait_recorded(&self, sent: &BTreeSet<String>) -> Vec<Recorded> {
        let covered = eventually_async(WITHIN, || async {
            let got: BTreeSet<String> = self.recorded().into_iter().map(|r| r.body).collect();
            sent.is_subset(&got)
        })
        .await;
        let recorded = self.recorded();
        assert!(
            covered,
            "the function got {} of {} payloads:\n{}",
            recorded.len(),
            sent.len(),
            self.gateway.output()
        );
        recorded
    }

    /// SIGTERM: the gateway stops its connectors (each logged as stopped) and exits 0.
    /// Neither it nor a connector logged the password.
    async fn stop(&mut self) {
        let status = self.gateway.stop(WITHIN).await;
        let output = self.gateway.output();
        assert!(
            status.success(),
            "gateway exit status {status:?}:\n{output}"
        );
        assert!(!output.contains(&self.password), "the password was logged");
        for c in &self.connectors {
            assert!(
                output.lines().any(|l| l.contains("connector stopped")
                    && l.contains(&format!("connector={}", c.name))),
                "connector {} was not stopped:\n{output}",
                c.name
            );
        }
    }
}

fn read_record(path: &Path) -> Recorded {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// `n` distinct payloads starting with `prefix`.
fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Starts the gateway with `fixture`'s connector on a fresh topic, publishes payloads
/// with the broker's own client, and checks that the function got each of them (at least
/// once, and nothing else) on that topic from that connector, that the connector
/// acknowledged everything, and that the gateway stops it on SIGTERM.
async fn delivered_through_the_gateway(
    name: &'static str,
    binary_name: &str,
    fixture: &dyn Fixture,
    gateway_env: &[(&str, &str)],
) {
    let topic = unique(&format!("system-{name}"));
    fixture.create_topic(&topic).await;
    let connector = ConnectorEntry::new(name, fixture, &topic, "");
    let mut system = System::start(&topic, Credentials::Files, vec![connector], gateway_env).await;
    system.assert_basic_auth_is_on().await;

    let sent = payloads(&topic, 20);
    let bytes: Vec<Vec<u8>> = sent.iter().map(|p| p.clone().into_bytes()).collect();
    fixture.produce(&topic, &bytes).await;
    let sent: BTreeSet<String> = sent.into_iter().collect();
    let recorded = system.wait_recorded(&sent).await;
    let got: BTreeSet<String> = recorded.iter().map(|r| r.body.clone()).collect();
    assert_eq!(got, sent, "the function got payloads nobody sent");
    for r in &recorded {
        assert_eq!(r.topic.as_deref(), Some(topic.as_str()), "{r:?}");
        assert_eq!(r.connector.as_deref(), Some(binary_name), "{r:?}");
        assert!(r.ce_id.is_some(), "{r:?}");
    }
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "{} messages left unacknowledged:\n{}",
        fixture.unacknowledged(&topic).await,
        system.gateway.output()
    );
    system.stop().await;
}

#[tokio::test]
async fn kafka_through_the_gateway() {
    delivered_through_the_gateway("kafka", "kafka-connector", &KafkaTopics::new(), &[]).await;
}

#[tokio::test]
async fn redis_streams_through_the_gateway() {
    delivered_through_the_gateway("redis", "redis-connector", &RedisStreams::new(), &[]).await;
}

/// The example batch function (`config/functions/batch.py`, a `process` function) beside
/// the recorder, through the real gateway and redis-connector: it receives batches and
/// reports the orders it cannot handle in `batchItemFailures`; exactly those are
/// dead-lettered (after their attempts), every other message is acknowledged.
#[tokio::test]
async fn a_batch_function_reports_its_failed_items_through_the_gateway() {
    let fixture = RedisStreams::new();
    let topic = unique("system-batch");
    fixture.create_topic(&topic).await;
    let connector = ConnectorEntry::new("redis", &fixture, &topic, "max_attempts = 2");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/functions/batch.py")
        .canonicalize()
        .unwrap();
    let functions = format!(
        r#"
[[functions]]
name = "orders-batch"
runtime = "process"
command = "python3 {script}"
annotations = {{ topic = "{topic}", "connector.batch.size" = "10", "connector.batch.window" = "200ms", "connector.ordering" = "none" }}
"#,
        script = script.display(),
    );
    let mut system =
        System::start_with(&topic, Credentials::Files, vec![connector], &[], &functions).await;
    let sent: Vec<String> = (0..20)
        .map(|n| format!(r#"{{"order": {n}, "fail": {}}}"#, n == 3 || n == 14))
        .collect();
    let bytes: Vec<Vec<u8>> = sent.iter().map(|p| p.clone().into_bytes()).collect();
    fixture.produce(&topic, &bytes).await;
    system.wait_recorded(&sent.iter().cloned().collect()).await;
    assert!(
        eventually_async(WITHIN, || async {
            fixture.dead_letters(&topic).await.len() >= 2
                && fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "dead letters {:?}, {} unacknowledged:\n{}",
        fixture.dead_letters(&topic).await,
        fixture.unacknowledged(&topic).await,
        system.gateway.output()
    );
    let mut dead: Vec<String> = fixture
        .dead_letters(&topic)
        .await
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect();
    dead.sort();
    assert_eq!(dead, [sent[14].clone(), sent[3].clone()]);
    system.stop().await;
}

#[tokio::test]
async fn nats_jetstream_through_the_gateway() {
    let fixture = JetStreamTopics::new()
        .await
        .with_consumer(&unique("system"));
    delivered_through_the_gateway("nats", "nats-connector", &fixture, &[]).await;
}

/// The gateway's own variables configure the gateway, not the connectors it starts:
/// with its durable async queue on a NATS of its own, given as the variable `nats_url`
/// (as a deployment sets it), the NATS connector still consumes from the NATS its file
/// names. (The connector reads a variable of the same name for its `[nats] url`.)
#[tokio::test]
async fn the_gateways_variables_do_not_reconfigure_its_connectors() {
    let queue_nats = QueueNats::start().await;
    let fixture = JetStreamTopics::new()
        .await
        .with_consumer(&unique("system"));
    let url = queue_nats.url();
    delivered_through_the_gateway("nats", "nats-connector", &fixture, &[("nats_url", &url)]).await;
    assert!(
        queue_nats.has_stream("faas-gateway-async").await,
        "the gateway's queue is not on its own NATS"
    );
}

/// A nats-server with JetStream on a loopback port of its choosing, for the gateway's
/// async queue; killed when dropped.
struct QueueNats {
    url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl QueueNats {
    /// Starts it and waits until it says where it listens.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nats.log");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(dir.path())
            .arg("-l")
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/test.sh)");
        let listening = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .find_map(|l| l.split("Listening for client connections on ").nth(1))
                .map(|addr| format!("nats://{}", addr.trim()))
        };
        let started = eventually_async(WITHIN, || async { listening().is_some() }).await;
        assert!(started, "nats-server did not start");
        Self {
            url: listening().unwrap(),
            child,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    /// Whether JetStream stream `name` exists on it.
    async fn has_stream(&self, name: &str) -> bool {
        let client = async_nats::connect(self.url()).await.unwrap();
        async_nats::jetstream::new(client)
            .get_stream(name)
            .await
            .is_ok()
    }
}

impl Drop for QueueNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sqs_through_the_gateway() {
    delivered_through_the_gateway("sqs", "sqs-connector", &SqsQueues::new(), &[]).await;
}

#[tokio::test]
async fn rabbitmq_through_the_gateway() {
    delivered_through_the_gateway("rabbitmq", "rabbitmq-connector", &RabbitQueues::new(), &[])
        .await;
}

/// PostgreSQL rows (logical replication, a payload column as body) through the gateway,
/// the slot confirmed past every one.
#[tokio::test]
async fn postgres_through_the_gateway() {
    delivered_through_the_gateway("postgres", "postgres-connector", &PgTables::new(), &[]).await;
}

#[tokio::test]
async fn mqtt_through_the_gateway() {
    delivered_through_the_gateway("mqtt", "mqtt-connector", &MqttTopics::new(), &[]).await;
}

/// The readiness the tests above wait for rests on the credentials: a connector whose
/// `env` turns `basic_auth` off (over what the supervisor passes) is refused by
/// `/system/*`, logs the 401 with the hint to check its credentials, and stays unready,
/// while the gateway keeps serving.
#[tokio::test]
async fn a_connector_without_the_credentials_is_refused_and_never_ready() {
    let fixture = RedisStreams::new();
    let topic = unique("system-noauth");
    fixture.create_topic(&topic).await;
    let connector =
        ConnectorEntry::new("redis", &fixture, &topic, "").with_env("basic_auth", "false");
    let mut system = System::launch(&topic, Credentials::Files, vec![connector], &[], "").await;
    let metrics_addr = system.metrics_addr("redis").await;
    assert!(
        eventually_async(WITHIN, || async {
            let output = system.gateway.output();
            output.lines().any(|l| {
                l.starts_with("[redis]") && l.contains("401") && l.contains("check basic_auth")
            })
        })
        .await,
        "no refusal logged:\n{}",
        system.gateway.output()
    );
    assert_eq!(
        integration_tests::http_get(metrics_addr, "/readyz")
            .await
            .map(|(status, _)| status),
        Some(503),
        "ready without a topic map:\n{}",
        system.gateway.output()
    );
    system.assert_basic_auth_is_on().await;
    system.stop().await;
}

// ---------------------------------------------------------------- async and callbacks

/// One callback the gateway posted.
#[derive(Debug, Clone)]
struct Callback {
    headers: HeaderMap,
    body: String,
}

impl Callback {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP server on a free loopback port that keeps every POST to `/done`.
struct CallbackReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Callback>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl CallbackReceiver {
    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let app = axum::Router::new().route(
            "/done",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let body = String::from_utf8_lossy(&body).into_owned();
                    sink.lock().unwrap().push(Callback { headers, body });
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            received,
            _server: server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/done", self.addr)
    }

    fn received(&self) -> Vec<Callback> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until what arrived satisfies `done`; returns it.
    async fn wait_until(
        &self,
        what: &str,
        system: &System,
        done: impl Fn(&[Callback]) -> bool,
    ) -> Vec<Callback> {
        let arrived = eventually_async(WITHIN, || async { done(&self.received()) }).await;
        let received = self.received();
        assert!(
            arrived,
            "{what}: {} callbacks arrived: {received:?}\n{}",
            received.len(),
            system.gateway.output()
        );
        received
    }
}

/// What every callback of the recording function carries: its status, its qualified
/// name, a call id, the duration, and its output as the body.
fn assert_callback_of_the_function(callback: &Callback) {
    assert_eq!(
        callback.header("x-function-status"),
        Some("200"),
        "{callback:?}"
    );
    assert_eq!(
        callback.header("x-function-name"),
        Some(format!("{FUNCTION}.openfaas-fn").as_str()),
        "{callback:?}"
    );
    assert!(
        callback
            .header("x-call-id")
            .is_some_and(|id| !id.is_empty()),
        "{callback:?}"
    );
    let seconds: f64 = callback
        .header("x-duration-seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no X-Duration-Seconds: {callback:?}"));
    assert!(seconds >= 0.0, "{callback:?}");
    assert!(callback.body.starts_with("done: "), "{callback:?}");
}

/// `POST /async-function/recorder` with `X-Callback-Url`: 202 with an `X-Call-Id`; the
/// embedded queue runs the function, and its output reaches the receiver with the same
/// call id and OpenFaaS's callback headers.
#[tokio::test]
async fn async_function_posts_the_result_to_the_callback_url() {
    let receiver = CallbackReceiver::start().await;
    let mut system =
        System::start(&unique("system-async"), Credentials::Files, Vec::new(), &[]).await;
    system.assert_basic_auth_is_on().await;
    let client = reqwest::Client::new();
    let mut call_ids = BTreeMap::new();
    for body in payloads("async", 3) {
        let accepted = client
            .post(system.url(&format!("/async-function/{FUNCTION}")))
            .header("x-callback-url", receiver.url())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(accepted.status(), 202);
        let id = accepted.headers()["x-call-id"].to_str().unwrap().to_owned();
        call_ids.insert(id, body);
    }
    let callbacks = receiver
        .wait_until("one callback per call", &system, |c| {
            c.len() >= call_ids.len()
        })
        .await;
    assert_eq!(callbacks.len(), call_ids.len(), "{callbacks:?}");
    for callback in &callbacks {
        assert_callback_of_the_function(callback);
        let id = callback.header("x-call-id").unwrap();
        let body = call_ids
            .get(id)
            .unwrap_or_else(|| panic!("a callback for an unknown call {id}: {callback:?}"));
        assert_eq!(callback.body, format!("done: {body}"));
    }
    let recorded: BTreeSet<String> = system.recorded().into_iter().map(|r| r.body).collect();
    assert_eq!(recorded, call_ids.into_values().collect());
    system.stop().await;
}

/// The whole asynchronous chain: a Redis stream entry → `redis-connector` with
/// `asynchronous_invocation` and `callback_url` → the gateway's queue → the function →
/// the function's output posted to the receiver. The connector's delivery ends at the
/// gateway's 202, so its entries are acknowledged whether or not the function ran yet.
#[tokio::test]
async fn a_connector_invoking_asynchronously_gets_results_at_its_callback_url() {
    let receiver = CallbackReceiver::start().await;
    let fixture = RedisStreams::new();
    let topic = unique("system-async-redis");
    fixture.create_topic(&topic).await;
    let extra = format!(
        "asynchronous_invocation = true\ncallback_url = \"{}\"",
        receiver.url()
    );
    let connector = ConnectorEntry::new("redis", &fixture, &topic, &extra);
    let mut system = System::start(&topic, Credentials::Toml, vec![connector], &[]).await;

    let sent = payloads(&topic, 10);
    let bytes: Vec<Vec<u8>> = sent.iter().map(|p| p.clone().into_bytes()).collect();
    fixture.produce(&topic, &bytes).await;
    let sent: BTreeSet<String> = sent.into_iter().collect();
    let recorded = system.wait_recorded(&sent).await;
    for r in &recorded {
        assert_eq!(r.topic.as_deref(), Some(topic.as_str()), "{r:?}");
        assert_eq!(r.connector.as_deref(), Some("redis-connector"), "{r:?}");
    }
    let expected: BTreeSet<String> = sent.iter().map(|p| format!("done: {p}")).collect();
    let outputs = |callbacks: &[Callback]| -> BTreeSet<String> {
        callbacks.iter().map(|c| c.body.clone()).collect()
    };
    let callbacks = receiver
        .wait_until("the output of every payload", &system, |c| {
            expected.is_subset(&outputs(c))
        })
        .await;
    assert_eq!(
        outputs(&callbacks),
        expected,
        "outputs of payloads nobody sent"
    );
    for callback in &callbacks {
        assert_callback_of_the_function(callback);
    }
    let ids: BTreeSet<&str> = callbacks
        .iter()
        .filter_map(|c| c.header("x-call-id"))
        .collect();
    assert_eq!(ids.len(), callbacks.len(), "one call id per invocation");
    assert!(
        eventually_async(WITHIN, || async {
            fixture.unacknowledged(&topic).await == 0
        })
        .await,
        "entries left unacknowledged"
    );
    system.stop().await;
}

/// The bundled gateway scales on backlogs its supervised connector reports: an `http`
/// function scaled to zero (min 0) that takes one message at a time from the connector
/// (`connector.max_inflight = 1`) gets replicas once messages wait for it, as many as
/// its backlog calls for (`connector.scale.target = 2`, up to max 3), which in-flight
/// requests alone (one at a time, target 50) never would; every message is delivered,
/// and it goes back to zero once nothing waits.
#[tokio::test]
async fn a_scaled_to_zero_function_scales_on_its_backlog() {
    let fixture = RedisStreams::new();
    let topic = unique("system-lazy");
    fixture.create_topic(&topic).await;
    let connector = ConnectorEntry::new("redis", &fixture, &topic, "");
    let functions = format!(
        r#"
[[functions]]
name = "lazy"
runtime = "http"
command = "python3 {RECORDING} lazy --delay 0.2"
labels = {{ "com.openfaas.scale.min" = "0", "com.openfaas.scale.max" = "3", "com.openfaas.scale.zero-duration" = "2s" }}
annotations = {{ topic = "{topic}", "connector.max_inflight" = "1", "connector.scale.target" = "2" }}
"#
    );
    let mut system =
        System::launch(&topic, Credentials::Files, vec![connector], &[], &functions).await;
    std::fs::create_dir(system.dir.join("lazy")).unwrap();
    let addr = system.metrics_addr("redis").await;
    assert!(
        wait_http(addr, "/readyz", 200, WITHIN).await,
        "connector not ready:\n{}",
        system.gateway.output()
    );
    let client = reqwest::Client::new();
    let replicas = || {
        let request = client
            .get(system.url("/system/function/lazy"))
            .basic_auth(USER, Some(&system.password))
            .send();
        async move {
            let status: serde_json::Value = request.await.unwrap().json().await.unwrap();
            status["replicas"].as_u64().unwrap()
        }
    };
    assert_eq!(replicas().await, 0, "min 0: no replica before any message");

    let sent: BTreeSet<String> = payloads(&topic, 20).into_iter().collect();
    let bytes: Vec<Vec<u8>> = sent.iter().map(|p| p.clone().into_bytes()).collect();
    fixture.produce(&topic, &bytes).await;
    let most = std::sync::atomic::AtomicU64::new(0);
    let scaled_out = eventually_async(WITHIN, || async {
        let now = replicas().await;
        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst)
            .max(now)
            == 3
    })
    .await;
    assert!(
        scaled_out,
        "at most {} replicas for 20 waiting messages:\n{}",
        most.into_inner(),
        system.gateway.output()
    );
    let lazy = system.dir.join("lazy");
    let got = || -> BTreeSet<String> {
        std::fs::read_dir(&lazy)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                (path.extension()? == "txt").then(|| std::fs::read_to_string(path).unwrap())
            })
            .collect()
    };
    assert!(
        eventually_async(WITHIN, || async { got() == sent }).await,
        "the function got {} of {} messages:\n{}",
        got().len(),
        sent.len(),
        system.gateway.output()
    );
    assert!(
        eventually_async(WITHIN, || async { replicas().await == 0 }).await,
        "not back to zero once nothing waits:\n{}",
        system.gateway.output()
    );
    system.stop().await;
}

/// The console's API on the real gateway finds the redis-connector it supervises (from
/// its backlog reports), shows its status, lists the dead letters of a function that
/// rejects, and replays them through the connector once the function is fixed; without
/// credentials it answers 401, and an unknown connector is a 404.
#[tokio::test]
async fn the_console_api_reaches_a_supervised_connectors_dead_letters() {
    let fixture = RedisStreams::new();
    let topic = unique("system-console");
    fixture.create_topic(&topic).await;
    let connector = ConnectorEntry::new("redis", &fixture, &topic, "");
    let functions = format!(
        r#"
[[functions]]
name = "picky"
runtime = "http"
command = "python3 {RECORDING} picky --fail 422"
annotations = {{ topic = "{topic}" }}
"#
    );
    let mut system =
        System::launch(&topic, Credentials::Files, vec![connector], &[], &functions).await;
    std::fs::create_dir(system.dir.join("picky")).unwrap();
    let addr = system.metrics_addr("redis").await;
    assert!(
        wait_http(addr, "/readyz", 200, WITHIN).await,
        "connector not ready:\n{}",
        system.gateway.output()
    );
    let client = reqwest::Client::new();
    let anonymous = client
        .get(system.url("/ui/api/connectors"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let get = |path: String| {
        let request = client
            .get(system.url(&path))
            .basic_auth(USER, Some(&system.password))
            .send();
        async move {
            let response = request.await.unwrap();
            let code = response.status().as_u16();
            (code, response.json::<serde_json::Value>().await.unwrap())
        }
    };

    let sent: BTreeSet<String> = payloads(&topic, 2).into_iter().collect();
    let bytes: Vec<Vec<u8>> = sent.iter().map(|p| p.clone().into_bytes()).collect();
    fixture.produce(&topic, &bytes).await;
    // The connector shows up once it has reported, with both messages dead-lettered.
    let found = std::sync::Mutex::new(serde_json::Value::Null);
    let listed = eventually_async(WITHIN, || async {
        let (code, list) = get("/ui/api/connectors".into()).await;
        let dead = list["connectors"].as_array().and_then(|all| {
            all.iter().find(|c| {
                c["connector"]["origin"] == "supervised"
                    && c["status"]["subscriptions"].as_array().is_some_and(|s| {
                        s.iter().any(|s| {
                            s["function"] == "picky.openfaas-fn"
                                && s["totals"]["dead_lettered"] == 2
                        })
                    })
            })
        });
        let done = code == 200 && dead.is_some();
        *found.lock().unwrap() = dead.cloned().unwrap_or(list);
        done
    })
    .await;
    let entry = found.into_inner().unwrap();
    assert!(listed, "{entry}\n{}", system.gateway.output());
    assert_eq!(entry["up"], true);
    assert_eq!(entry["connector"]["name"], "redis-connector");
    let id = entry["connector"]["id"].as_str().unwrap().to_owned();

    let (code, page) = get(format!(
        "/ui/api/connectors/{id}/dead-letters?function=picky&status=4xx"
    ))
    .await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["matched"], 2, "{page}");
    let (code, missing) = get("/ui/api/connectors/nope/dead-letters".into()).await;
    assert_eq!(code, 404, "{missing}");

    std::fs::write(system.dir.join("fixed"), "").unwrap();
    let replayed = client
        .post(system.url(&format!("/ui/api/connectors/{id}/dead-letters/replay")))
        .basic_auth(USER, Some(&system.password))
        .json(&serde_json::json!({"function": "picky"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 200);
    let summary: serde_json::Value = replayed.json().await.unwrap();
    assert_eq!(summary["summary"]["replayed"], 2, "{summary}");
    let picky = system.dir.join("picky");
    let got: BTreeSet<String> = std::fs::read_dir(&picky)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "txt").then(|| std::fs::read_to_string(path).unwrap())
        })
        .collect();
    assert_eq!(got, sent, "the fixed function got both, once");
    let (_, page) = get(format!("/ui/api/connectors/{id}/dead-letters")).await;
    assert_eq!(page["matched"], 0, "{page}");
    system.stop().await;
}
