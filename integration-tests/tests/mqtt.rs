//! `mqtt-connector` end to end: the real binary against the real Mosquitto (`MQTT_URL`,
//! default `tcp://127.0.0.1:1883`), MQTT 5, QoS 1 and a persistent session, and a real
//! HTTP gateway. Messages are published with rumqttc, as any other client would. Every
//! test uses its own topics and client ids. The shared scenario suite runs first; then
//! what is particular to MQTT: SIGKILL while publishing, order per topic, `+` and `#`
//! filters, a shared subscription split between two replicas, user properties as
//! headers, and replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::mqtt_broker::MqttTopics;
use integration_tests::replay::dead_letters_replayed;
use integration_tests::scenarios::{self, Fixture, eventually_async};
use integration_tests::{
    FakeGateway, Process, Reply, eventually, free_addr, http_get, metric, unique, wait_http,
};

const WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- the shared suite

#[tokio::test]
async fn mqtt_delivered_once() {
    scenarios::delivered_once(&MqttTopics::new()).await;
}

#[tokio::test]
async fn mqtt_scaler_follows_backlog() {
    integration_tests::keda::scaler_follows_backlog(&MqttTopics::new()).await;
}

#[tokio::test]
async fn mqtt_failure_then_success() {
    scenarios::failure_then_success(&MqttTopics::new()).await;
}

/// The fixture's probe takes the connector's session over only once the connector holds
/// nothing for it (PUBACKs written): a takeover between a dead letter and its PUBACK had
/// the broker deliver the message again, dead-lettered twice under parallel load.
#[tokio::test]
async fn mqtt_dead_letter_on_4xx() {
    scenarios::dead_letter_on_4xx(&MqttTopics::new()).await;
}

#[tokio::test]
async fn mqtt_nothing_lost_across_kill() {
    scenarios::nothing_lost_across_kill(&MqttTopics::new()).await;
}

#[tokio::test]
async fn mqtt_drain_on_shutdown() {
    scenarios::drain_on_shutdown(&MqttTopics::new()).await;
}

#[tokio::test]
async fn mqtt_dead_letters_are_replayed() {
    dead_letters_replayed(&MqttTopics::new()).await;
}

// ---------------------------------------------------------------- MQTT specifics

fn config(gw: &FakeGateway, metrics_addr: SocketAddr, connector: &str, mqtt: &str) -> String {
    format!(
        r#"[connector]
gateway_url = "{gw}"
metrics_addr = "{metrics_addr}"
rebuild_interval = "300ms"
upstream_timeout = "10s"
max_attempts = 3
{connector}

[connector.backoff]
initial = "50ms"
max = "200ms"

{mqtt}
"#,
        gw = gw.url(),
    )
}

/// A connector process and its metrics address.
struct Connector {
    process: Process,
    metrics: SocketAddr,
    config: String,
}

impl Connector {
    async fn start(gw: &FakeGateway, connector: &str, mqtt: &str) -> Self {
        let metrics = free_addr();
        let config = config(gw, metrics, connector, mqtt);
        let process = Process::start(&MqttTopics::new().binary(), &config, &[]);
        let mut c = Self {
            process,
            metrics,
            config,
        };
        c.wait_ready().await;
        c
    }

    async fn wait_ready(&mut self) {
        assert!(
            wait_http(self.metrics, "/readyz", 200, WITHIN).await,
            "connector not ready:\n{}",
            self.process.output()
        );
    }

    async fn restart(&mut self) {
        self.process = Process::start(&MqttTopics::new().binary(), &self.config, &[]);
        self.wait_ready().await;
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i:04}").into_bytes())
        .collect()
}

fn bodies(gw: &FakeGateway, function: &str) -> Vec<Vec<u8>> {
    gw.requests_to(function)
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect()
}

/// QoS 1 and a persistent session: the connector is killed with SIGKILL while a client
/// publishes, restarted, and every message reaches the function (duplicates allowed).
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_while_publishing_loses_nothing() {
    let fx = MqttTopics::new();
    let topic = unique("sigkill");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("kill-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(20))
    });
    let mut connector = Connector::start(&gw, "max_inflight = 8", &fx.source_config(&topic)).await;
    let sent = payloads("sigkill", 300);
    let publishing = {
        let (sent, topic) = (sent.clone(), topic.clone());
        tokio::spawn(async move {
            let fx = MqttTopics::new();
            for chunk in sent.chunks(10) {
                fx.publish(&topic, chunk, &[]).await;
            }
        })
    };
    assert!(
        eventually(WITHIN, || gw.requests_to("kill-fn").len() >= 40).await,
        "nothing delivered before the kill:\n{}",
        connector.process.output()
    );
    connector.process.kill();
    assert!(
        gw.requests_to("kill-fn").len() < sent.len(),
        "all delivered before the kill; the test proves nothing"
    );
    connector.restart().await;
    publishing.await.unwrap();
    let delivered = |gw: &FakeGateway| bodies(gw, "kill-fn").into_iter().collect::<BTreeSet<_>>();
    assert!(
        eventually(Duration::from_secs(60), || delivered(&gw).len()
            == sent.len())
        .await,
        "lost {} messages across the kill:\n{}",
        sent.len() - delivered(&gw).len(),
        connector.process.output()
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "left unacknowledged"
    );
}

/// With `ordering = "key"`, messages of one topic reach the function in publish order,
/// while topics run in parallel; the function subscribes with `+`.
#[tokio::test]
async fn order_is_kept_per_topic() {
    let fx = MqttTopics::new();
    let p = unique("order");
    let filter = format!("{p}/+");
    fx.make_session(&MqttTopics::client_id(&p), std::slice::from_ref(&filter))
        .await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("ordered", &filter, |req, _| {
        let n: u64 = String::from_utf8_lossy(&req.body)
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Reply::ok().delay(Duration::from_millis((n * 7) % 20))
    });
    let _connector = Connector::start(
        &gw,
        "ordering = \"key\"\nmax_inflight = 32",
        &fx.source_config(&p),
    )
    .await;
    let keys: Vec<String> = (0..3).map(|i| format!("{p}/k{i}")).collect();
    for k in &keys {
        let batch: Vec<Vec<u8>> = (0..20).map(|n| format!("{k}-{n}").into_bytes()).collect();
        fx.publish(k, &batch, &[]).await;
    }
    assert!(eventually(WITHIN, || gw.requests_to("ordered").len() >= 60).await);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in gw.requests_to("ordered") {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let (k, n) = body.rsplit_once('-').unwrap();
        assert_eq!(r.header("x-topic").as_deref(), Some(k));
        per_key
            .entry(k.to_owned())
            .or_default()
            .push(n.parse().unwrap());
    }
    assert_eq!(per_key.len(), 3);
    for (k, seq) in per_key {
        assert_eq!(seq, (0..20).collect::<Vec<u64>>(), "out of order on {k}");
    }
}

/// `+` and `#` in annotations select messages as the broker does; overlapping filters do
/// not deliver a message twice; the connector subscribes from the topic map.
#[tokio::test]
async fn wildcard_filters_match_as_the_broker_does() {
    let fx = MqttTopics::new();
    let p = unique("wild");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("one-level", &format!("{p}/+/temp"), |_, _| Reply::ok());
    gw.function("any", &format!("{p}/#"), |_, _| Reply::ok());
    let connector = Connector::start(&gw, "", &fx.source_config(&p)).await;
    for (topic, body) in [
        (format!("{p}/a/temp"), "short"),
        (format!("{p}/a/b/c"), "long"),
        (p.clone(), "parent"),
        (format!("{p}x/a/temp"), "other"),
    ] {
        fx.publish(&topic, &[body.as_bytes().to_vec()], &[]).await;
    }
    assert!(
        eventually(WITHIN, || gw.requests_to("any").len() >= 3).await,
        "{}",
        connector.process.output()
    );
    // Settled before the exact counts: asking the broker takes the session over, and
    // what is in flight then is delivered again.
    assert!(
        eventually_async(WITHIN, || async {
            metric(&connector.metrics().await, "connector_mqtt_held_messages") == Some(0.0)
        })
        .await
    );
    assert_eq!(bodies(&gw, "one-level"), [b"short".to_vec()]);
    let mut any = bodies(&gw, "any");
    any.sort();
    assert_eq!(
        any,
        [b"long".to_vec(), b"parent".to_vec(), b"short".to_vec()]
    );
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&p).await == 0 }).await,
        "left unacknowledged"
    );
}

/// Two replicas in one share group (`$share/<group>/<filter>`, MQTT 5) split the
/// messages: each is delivered once across both, and both do some of the work.
#[tokio::test]
async fn a_shared_subscription_splits_messages_between_replicas() {
    let fx = MqttTopics::new();
    let topic = unique("shared");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("shared-fn", &topic, |_, _| {
        Reply::ok().delay(Duration::from_millis(10))
    });
    let group = unique("g");
    let replica = |n: u32| {
        format!(
            "[mqtt]\nbroker = \"{}\"\nclient_id = \"it-{topic}-{n}\"\nshare_group = \"{group}\"\ndead_letter_topic = \"\"\n",
            integration_tests::mqtt_broker::mqtt_url()
        )
    };
    let a = Connector::start(&gw, "max_inflight = 4", &replica(1)).await;
    let b = Connector::start(&gw, "max_inflight = 4", &replica(2)).await;
    let sent = payloads("shared", 200);
    fx.publish(&topic, &sent, &[]).await;
    assert!(
        eventually(WITHIN, || gw.requests_to("shared-fn").len() >= sent.len()).await,
        "only {} of {} delivered",
        gw.requests_to("shared-fn").len(),
        sent.len()
    );
    let series = r#"connector_deliveries_total{function="shared-fn",outcome="delivered"}"#;
    let delivered = || async {
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        (
            metric(&ma, series).unwrap_or(0.0),
            metric(&mb, series).unwrap_or(0.0),
        )
    };
    assert!(
        eventually_async(WITHIN, || async {
            let (da, db) = delivered().await;
            da + db >= sent.len() as f64
        })
        .await
    );
    let got = bodies(&gw, "shared-fn");
    assert_eq!(got.len(), sent.len(), "a message reached both replicas");
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        sent.iter().cloned().collect::<BTreeSet<_>>()
    );
    let (da, db) = delivered().await;
    assert!(
        da > 0.0 && db > 0.0,
        "one replica did all the work: {da} / {db}"
    );
}

/// MQTT 5 user properties reach the function as headers, except those that would shape
/// the HTTP exchange or speak for the connector; a dead letter carries them with the
/// provenance.
#[tokio::test]
async fn user_properties_become_headers_and_forbidden_ones_are_dropped() {
    let fx = MqttTopics::new();
    let topic = unique("props");
    fx.create_topic(&topic).await;
    let gw = FakeGateway::start().await.unwrap();
    gw.function("props-fn", &topic, |_, _| {
        Reply::status(400).body(b"no thanks")
    });
    let connector = Connector::start(&gw, "", &fx.source_config(&topic)).await;
    fx.publish(
        &topic,
        &[b"payload".to_vec()],
        &[
            ("x-tenant", "acme"),
            // A valid W3C context passes on (traces off: unchanged); see connector-sdk's
            // `trace` module.
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("Host", "evil.example"),
            ("Authorization", "Bearer stolen"),
            ("Content-Length", "1"),
            ("X-Callback-Url", "http://evil.example/"),
            ("ce-id", "spoofed"),
            ("X-Mqtt-Topic", "spoofed"),
        ],
    )
    .await;
    assert!(
        eventually_async(WITHIN, || async { !fx.letters(&topic).await.is_empty() }).await,
        "no dead letter:\n{}",
        connector.process.output()
    );
    let r = &gw.requests_to("props-fn")[0];
    assert_eq!(r.header("x-tenant").as_deref(), Some("acme"));
    assert_eq!(
        r.header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_ne!(r.header("host").as_deref(), Some("evil.example"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("x-callback-url"), None);
    assert_ne!(r.header("ce-id").as_deref(), Some("spoofed"));
    assert_eq!(r.header("x-mqtt-topic").as_deref(), Some(topic.as_str()));
    assert_eq!(r.body.as_ref(), b"payload");
    let letters = fx.letters(&topic).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.payload, b"payload");
    assert_eq!(letter.property("x-dead-letter-function"), Some("props-fn"));
    assert_eq!(letter.property("x-dead-letter-status"), Some("400"));
    assert_eq!(letter.property("x-dead-letter-response"), Some("no thanks"));
    assert_eq!(letter.property("x-dead-letter-topic"), Some(topic.as_str()));
    assert_eq!(letter.property("x-tenant"), Some("acme"));
    assert!(
        eventually_async(WITHIN, || async { fx.unacknowledged(&topic).await == 0 }).await,
        "the rejected message was not acknowledged after its dead letter"
    );
    let m = connector.metrics().await;
    assert_eq!(metric(&m, "connector_mqtt_held_messages"), Some(0.0), "{m}");
}

/// A configuration that cannot work stops the connector before it connects, with a
/// non-zero exit naming each key.
#[tokio::test]
async fn a_bad_configuration_names_the_key() {
    let gw = FakeGateway::start().await.unwrap();
    let mut process = Process::start(
        &MqttTopics::new().binary(),
        &config(
            &gw,
            free_addr(),
            "",
            "[mqtt]\nqos = 2\nbroker = \"http://x\"\n",
        ),
        &[],
    );
    let status = process.wait(WITHIN).await;
    assert!(!status.success(), "{}", process.output());
    let output = process.output();
    assert!(
        output.contains("mqtt.qos") && output.contains("mqtt.broker"),
        "{output}"
    );
}

/// A Mosquitto of the test's own with TLS and a password file (started here, stopped on
/// drop): the connector connects with `tls_ca_file`, `username` and the password from
/// the environment (a secret), and a wrong password stops it at start.
#[tokio::test]
async fn tls_and_credentials() {
    struct Broker(std::process::Child);
    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = integration_tests::tls_certificates(dir.path());
    let d = dir.path().display();
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b", &format!("{d}/passwd"), "app", "s3cret"])
        .status()
        .unwrap();
    assert!(ok.success());
    let port = free_addr().port();
    std::fs::write(
        dir.path().join("mosquitto.conf"),
        format!(
            "user root\nlistener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nallow_anonymous false\npassword_file {d}/passwd\n"
        ),
    )
    .unwrap();
    let _broker = Broker(
        std::process::Command::new("mosquitto")
            .args(["-c", &format!("{d}/mosquitto.conf")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(WITHIN, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok())
        .await
    );
    let topic = unique("tls");
    let gw = FakeGateway::start().await.unwrap();
    gw.function("tls-fn", &topic, |_, _| Reply::ok());
    let mqtt = format!(
        "[mqtt]\nbroker = \"ssl://127.0.0.1:{port}\"\ntls_ca_file = \"{}\"\nusername = \"app\"\nclient_id = \"it-{topic}\"\ndead_letter_topic = \"\"\n",
        ca.display()
    );
    let metrics = free_addr();
    let mut wrong = Process::start(
        &MqttTopics::new().binary(),
        &config(&gw, metrics, "", &mqtt),
        &[("mqtt_password", "wrong")],
    );
    let status = wrong.wait(WITHIN).await;
    assert!(!status.success(), "{}", wrong.output());
    let connector = Process::start(
        &MqttTopics::new().binary(),
        &config(&gw, metrics, "", &mqtt),
        &[("mqtt_password", "s3cret")],
    );
    assert!(
        wait_http(metrics, "/readyz", 200, WITHIN).await,
        "not ready:\n{}",
        connector.output()
    );
    let published = std::process::Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "--cafile",
            &ca.display().to_string(),
            "-u",
            "app",
            "-P",
            "s3cret",
        ])
        .args(["-q", "1", "-t", &topic, "-m", "over-tls"])
        .status()
        .unwrap();
    assert!(published.success());
    assert!(
        eventually(WITHIN, || !gw.requests_to("tls-fn").is_empty()).await,
        "{}",
        connector.output()
    );
    assert_eq!(bodies(&gw, "tls-fn"), [b"over-tls".to_vec()]);
    assert!(!connector.output().contains("s3cret"));
}
