//! End-to-end throughput of `mqtt-connector` (MQTT 5, QoS 1, persistent session, manual
//! PUBACK after each delivery) beside the plain HTTP ceiling and a plain rumqttc consumer,
//! in one run.
//!
//! ```text
//! cargo bench -p mqtt-connector --bench throughput
//! ```
//!
//! Starts a Mosquitto of its own (`mosquitto` on the PATH) on a free loopback port, with
//! no limit on a session's queue (the default, 1,000, would drop most of the backlog) and
//! 128 messages in flight per client (the default is 20), the connector's receive maximum
//! at `max_inflight` 64. A no-op function (and the
//! gateway's `/system/functions`, and `/count` of calls answered) runs in a child
//! process (`connector_sdk::testing::load`). Then:
//!
//! - **ceiling**: a plain HTTP loop making the same requests the connector makes, 64 in
//!   flight;
//! - **plain client**: rumqttc consuming a backlog of `COUNT` QoS 1 messages from a
//!   persistent session, acknowledging each at once (Mosquitto's own rate);
//! - **connector**: the release binary consuming the same backlog, `max_inflight` 64
//!   (the MQTT 5 receive maximum). The clock starts at the function's first call and
//!   stops at its `COUNT`th.
//!
//! Printed: messages per second, the ratios, the connector's CPU time per message and its
//! peak resident memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use connector_sdk::Message;
use connector_sdk::testing::load::{self, NoopFunction};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

const PAYLOAD: &[u8] = br#"{"order":42,"amount":"19.99","currency":"EUR"}"#;
/// Messages per row; `BENCH_COUNT` overrides it.
static COUNT: LazyLock<usize> = LazyLock::new(|| {
    std::env::var("BENCH_COUNT").map_or(40_000, |v| v.parse().expect("BENCH_COUNT: a number"))
});
const CONCURRENCY: usize = 64;

fn main() {
    if load::serve_if_asked() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

/// A Mosquitto of the benchmark's own, stopped on drop.
struct Broker {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Self {
        let port = load::free_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages {}\n",
                2 * CONCURRENCY
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto on the PATH");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            child,
            _dir: dir,
        }
    }

    async fn connect(&self, id: &str, clean: bool) -> (AsyncClient, EventLoop) {
        let mut o = MqttOptions::new(id, "127.0.0.1", self.port);
        o.set_clean_start(clean)
            .set_session_expiry_interval((!clean).then_some(3600))
            .set_manual_acks(true)
            .set_receive_maximum(Some(2 * CONCURRENCY as u16));
        // Room for every acknowledgement: the plain client acks from the loop that polls.
        let (client, mut events) = AsyncClient::new(o, *COUNT + 1024);
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
                return (client, events);
            }
        }
    }

    /// The persistent session `id` subscribed to `topic`, and `COUNT` messages queued
    /// for it, each acknowledged by the broker.
    async fn backlog(&self, id: &str, topic: &str) {
        let (client, mut events) = self.connect(id, false).await;
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        until(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
        disconnect(&client, &mut events).await;
        let (publisher, mut events) = self.connect("bench-publisher", true).await;
        let topic = topic.to_owned();
        let publishing = tokio::spawn(async move {
            for _ in 0..*COUNT {
                publisher
                    .publish(topic.clone(), QoS::AtLeastOnce, false, PAYLOAD)
                    .await
                    .unwrap();
            }
            publisher
        });
        let mut acked = 0;
        until(&mut events, |p| {
            acked += usize::from(matches!(p, Packet::PubAck(_)));
            acked == *COUNT
        })
        .await;
        let publisher = publishing.await.unwrap();
        disconnect(&publisher, &mut events).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends DISCONNECT (after every request before it) and waits until it went out.
async fn disconnect(client: &AsyncClient, events: &mut EventLoop) {
    client.disconnect().await.unwrap();
    while let Ok(e) = events.poll().await {
        if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            return;
        }
    }
}

async fn until(events: &mut EventLoop, mut done: impl FnMut(&Packet) -> bool) {
    loop {
        if let Event::Incoming(p) = events.poll().await.unwrap()
            && done(&p)
        {
            return;
        }
    }
}

async fn bench() {
    let broker = Broker::start();
    let topic = format!("bench/{}", uuid::Uuid::new_v4().simple());
    let function = NoopFunction::spawn(&topic).unwrap();
    let _ = ceiling_run(function.addr, *COUNT / 10).await; // warm-up
    let ceiling = ceiling_run(function.addr, *COUNT).await;
    let plain = plain_client_run(&broker, &topic).await;
    let (connector, cpu, peak_kib) = connector_run(&broker, &function, &topic).await;
    println!(
        "| messages | ceiling req/s | plain rumqttc msg/s | connector msg/s | of ceiling | of plain client | connector CPU/msg | RSS peak |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {ceiling:.0} | {plain:.0} | {connector:.0} | {:.2} | {:.2} | {:.1} µs | {:.1} MiB |",
        *COUNT,
        connector / ceiling,
        connector / plain,
        cpu.as_secs_f64() * 1e6,
        peak_kib as f64 / 1024.0,
    );
}

/// Plain requests, as the connector makes them, `CONCURRENCY` in flight.
async fn ceiling_run(addr: SocketAddr, count: usize) -> f64 {
    load::ceiling(
        &format!("http://{addr}"),
        "mqtt-connector",
        CONCURRENCY,
        count as u64,
        |i| {
            let mut message =
                Message::new("bench/t", PAYLOAD, format!("bench/t/{i}/0"), "mqtt://bench");
            for (name, value) in [
                ("X-Mqtt-Topic", "bench/t"),
                ("X-Mqtt-Qos", "1"),
                ("X-Mqtt-Retain", "false"),
                ("X-Mqtt-Dup", "false"),
            ] {
                message.add_header(name, value);
            }
            message
        },
    )
    .await
    .unwrap()
}

/// rumqttc alone: the backlog consumed from a persistent session, each message
/// acknowledged on receipt.
async fn plain_client_run(broker: &Broker, topic: &str) -> f64 {
    let id = "bench-plain";
    broker.backlog(id, topic).await;
    let (client, mut events) = broker.connect(id, false).await;
    let mut received = 0;
    let mut started = None;
    while received < *COUNT {
        if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
            started.get_or_insert_with(Instant::now);
            client.ack(&p).await.unwrap();
            received += 1;
        }
    }
    let took = started.unwrap().elapsed();
    // Until the last PUBACK went out, then the session is dropped.
    disconnect(&client, &mut events).await;
    (*COUNT - 1) as f64 / took.as_secs_f64()
}

async fn connector_run(
    broker: &Broker,
    function: &NoopFunction,
    topic: &str,
) -> (f64, Duration, u64) {
    let id = "bench-connector";
    broker.backlog(id, topic).await;
    let base = function.calls().await.unwrap();
    let metrics = load::free_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[connector]
gateway_url = "{gateway}"
metrics_addr = "{metrics}"
topics = ["{topic}"]
max_inflight = {CONCURRENCY}

[mqtt]
broker = "tcp://127.0.0.1:{port}"
client_id = "{id}"
dead_letter_topic = ""
"#,
            gateway = function.url(),
            port = broker.port,
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-connector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The clock starts at the first call: consuming the backlog, not starting up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (cpu, started, first) = loop {
        let calls = function.calls().await.unwrap();
        if calls > base {
            break (load::cpu_time(pid), Instant::now(), calls - base);
        }
        assert!(Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while function.calls().await.unwrap() < base + *COUNT as u64 {
        assert!(Instant::now() < deadline, "connector did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let cpu = load::cpu_time(pid) - cpu;
    let peak_kib = load::status_kib(pid, "VmHWM");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "connector exit status {status:?}");
    let n = *COUNT as u64 - first;
    (n as f64 / took.as_secs_f64(), cpu / n as u32, peak_kib)
}
